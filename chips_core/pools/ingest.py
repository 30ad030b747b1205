"""Ingest an input source into the workspace: `pools`, `pairs` and `rejects` rows.

Records are checked (read + fully decoded) in a process pool, chunk by chunk; each chunk's pairs, rejects
and the resume point (`pools.options.next_row`) are committed in ONE short transaction, so a killed run
resumes on re-run with nothing lost and nothing duplicated, and a dashboard can read between chunks.

Pool status: `ingesting` while running (also after a SIGKILL: run again to resume), `interrupted` after
Ctrl-C or a cancelled job (run again to resume), `ready` when done with at least one pair, `failed` when
the source broke off mid-way or every record was rejected (the reason is in `pools.options.error`; the
rejects are kept). A source whose header, columns or encoding are wrong is refused before any pool row is
written. Running the same ingest again retries a failed pool from scratch; `replace=True` (`--replace`)
replaces a pool ingested from another source or with other options (refused while anything depends on
it: see `chips_core.workspace.remove`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from chips_core.pools import dicom as pools_dicom
from chips_core.pools import text_encoding
from chips_core.pools.parallel import Checker
from chips_core.pools.readers import (
    FORMATS,
    ReaderOptions,
    caption_files,
    count_records,
    detect_format,
    is_brace_pattern,
    iter_records,
)
from chips_core.pools.records import REASONS, Checked, PoolError
from chips_core.workspace import catalog, store
from chips_core.workspace.store import Workspace

ProgressFn = Callable[[int, "int | None"], None]
KINDS = ("pool", "eval")
_PAIRS_SCHEMA = pa.schema(
    [
        ("pool_id", pa.int32()),
        ("pair_id", pa.int64()),
        ("row_index", pa.int64()),
        ("filepath", pa.string()),
        ("caption", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
_REJECTS_SCHEMA = pa.schema(
    [("pool_id", pa.int32()), ("source_ref", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)
# Which reader options matter for each format (they are part of the pool's identity).
_FORMAT_OPTIONS = {
    "csv": ("image_col", "caption_col", "label_col", "sep", "encoding", "allow_outside"),
    "tsv": ("image_col", "caption_col", "label_col", "sep", "encoding", "allow_outside"),
    "parquet": ("image_col", "caption_col", "label_col", "allow_outside"),
    "folder": ("caption_template", "encoding", "allow_outside"),
    "dicom": ("caption_template", "allow_outside"),
    "wds": ("json_caption_key", "label_col", "encoding", "allow_outside"),
}
# Options added after pools were first ingested: their value for a pool that does not record them.
_OPTION_DEFAULTS = {"encoding": "auto", "allow_outside": []}
# Bookkeeping kept in `pools.options` beside the reader options (not part of the pool's identity).
_BOOKKEEPING = ("next_row", "error", "encoding_detected")


class _ConflictError(PoolError):
    """Another process ingests, replaced or removed the same pool: its status is that process's to set."""


# What to try when every record of a source was rejected for this reason.
_HINTS = {
    "outside_root": "--allow-outside DIR",
    "undecodable_caption": "--encoding",
    "missing_file": "paths are relative to the manifest's folder; --image-col",
    "bad_path": "--image-col",
    "missing_caption": "--caption-col / sidecars / --json-caption-key",
    "empty_caption": "--caption-col",
    "malformed_row": "--sep",
}


class IngestError(PoolError):
    """An ingest that ran but kept no pair (or broke off): the pool is marked failed; `summary` says what
    was checked and rejected."""

    def __init__(self, message: str, summary: IngestSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class IngestSummary:
    """What a pool holds after `ingest` (totals over all runs) and what this call did."""

    pool_id: int
    name: str
    kind: str
    source: str
    fmt: str
    n_pairs: int
    n_rejects: int
    reject_counts: dict[str, int] = field(default_factory=dict)
    n_checked: int = 0  # records checked by this call
    resumed_from: int = 0  # first record index this call checked (> 0: a resumed run)
    already_done: bool = False
    seconds: float = 0.0
    status: str = "ready"
    encoding: str | None = (
        None  # the manifest's text encoding and how it was chosen, e.g. 'cp1252 (detected)'
    )
    replaced: bool = False  # this call replaced an earlier pool of the same name

    def format(self) -> str:
        """A short multi-line report for the command line."""
        head = f"pool {self.name!r} ({self.kind}, {self.fmt}) from {self.source}"
        if self.encoding:
            head += f", encoding {self.encoding}"
        if self.replaced:
            head += " (replaces the earlier pool of this name)"
        if self.already_done:
            state = "already ingested, nothing to do"
        elif self.resumed_from:
            state = f"resumed at record {self.resumed_from}, checked {self.n_checked} records"
        else:
            state = f"checked {self.n_checked} records"
        if not self.already_done:
            state += f" in {self.seconds:.1f} s"
        lines = [head, f"  {state}", f"  {self.n_pairs} pairs, {self.n_rejects} rejected"]
        for reason, n in sorted(self.reject_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason:<22}{n:>8}  {REASONS.get(reason, '')}")
        if self.n_rejects:
            lines.append(f"  details: SELECT * FROM rejects WHERE pool_id = {self.pool_id}")
        return "\n".join(lines)


def _normalise_source(source: str | os.PathLike) -> str:
    text = os.fspath(source)
    if not text.strip():
        raise PoolError("input source is empty")
    return os.path.abspath(os.path.expanduser(text))


def _options(fmt: str, opts: ReaderOptions) -> dict:
    out = {k: getattr(opts, k) for k in _FORMAT_OPTIONS[fmt]}
    if "allow_outside" in out:
        out["allow_outside"] = list(out["allow_outside"])
    return out


def _chunks(records: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _split_options(stored: str | None) -> tuple[dict, dict]:
    """(reader options with defaults for options added later, bookkeeping) of a `pools.options` value."""
    opts = json.loads(stored) if stored else {}
    book = {k: opts.pop(k) for k in _BOOKKEEPING if k in opts}
    return opts, book


def _create_pool(con, ws: Workspace, name: str, kind: str, source: str, fmt: str, options: dict) -> int:  # noqa: ANN001
    pool_id = ws.next_id(con)
    catalog.insert_pool(
        con, pool_id, name, kind, source, fmt, json.dumps({**options, "next_row": 0}), "ingesting"
    )
    return pool_id


def _commit(con: duckdb.DuckDBPyConnection, name: str) -> None:
    try:
        store.commit(con)
    except (duckdb.ConstraintException, duckdb.TransactionException):
        raise _ConflictError(
            f"pool {name!r} was just created by another process; run again to resume it"
        ) from None


def _open_pool(
    ws: Workspace, name: str, kind: str, source: str, fmt: str, options: dict, replace: bool = False
) -> tuple[int, int, bool, dict, bool]:
    """(pool_id, next_row, done, bookkeeping, replaced) for pool `name`.

    A new name makes a new pool. The same source and options resume an unfinished pool and return a finished
    one as done. A failed (or empty) pool is replaced by a fresh one, whatever the source and options (it
    holds no pair). Otherwise another source or other options are refused unless `replace`, which removes
    the old pool first. Replacing is refused while anything depends on the old pool.
    """
    from chips_core.workspace import remove

    with ws.connect() as con:
        store.begin(con)
        try:
            rec = catalog.pool_record(con, name)
            if rec is None:
                pool_id = _create_pool(con, ws, name, kind, source, fmt, options)
                _commit(con, name)
                return pool_id, 0, False, {}, False
            pool_id, old_kind, old_source, old_fmt = rec.pool_id, rec.kind, rec.source, rec.format
            old_options, status, n_pairs = rec.options, rec.status, rec.n_pairs
            old, book = _split_options(old_options)
            old = {**{k: v for k, v in _OPTION_DEFAULTS.items() if k in options}, **old}
            same = (old_source, old_fmt, old, old_kind) == (source, fmt, options, kind)
            failed = status == "failed" or (status == "ready" and n_pairs == 0)
            if replace or failed:
                deps = remove.find_dependents(ws, con, int(pool_id), name)
                if not deps.empty():
                    raise PoolError(
                        f"pool {name!r} cannot be replaced: {deps.describe()} depend on it; "
                        f"remove them with `chips rm {ws.root} {name} --force` first, or choose another name"
                    )
                remove.delete_rows(con, deps)
                pool_id = _create_pool(con, ws, name, kind, source, fmt, options)
                _commit(con, name)
                return pool_id, 0, False, {}, True
            if same and status != "ready":  # resumed: running again
                catalog.set_pool_status(con, pool_id, "ingesting")
            store.commit(con)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                store.rollback(con)
            raise
    fix = "add --replace (replace=True) to replace it, `chips rm` it, or choose another name"
    if (old_source, old_fmt) != (source, fmt):
        raise PoolError(
            f"pool {name!r} already exists with source {old_source} ({old_fmt}) (status {status}); "
            f"refusing to add {source} ({fmt}) under the same name: {fix}"
        )
    if not same:
        raise PoolError(
            f"pool {name!r} was ingested as {old_kind} with options {old} (status {status}); "
            f"now asked as {kind} with {options}: {fix}"
        )
    return int(pool_id), int(book.get("next_row", 0)), status == "ready", book, False


def _write_chunk(
    ws: Workspace, pool_id: int, options: dict, results: list[Checked], start: int, next_row: int
) -> None:
    """One transaction: the chunk's pairs and rejects (duplicates become rejects) and the resume point.

    The stored resume point must still be `start`: otherwise another process is ingesting the same pool.
    """
    rejects = [r for r in results if r.reason is not None]
    first: dict[int, Checked] = {}
    for r in results:
        if r.reason is None:
            if r.pair_id in first:
                f = first[r.pair_id]
                rejects.append(_duplicate(r, f"{f.source_ref} ({f.image_ref})"))
            else:
                first[r.pair_id] = r
    with ws.connect() as con:
        store.begin(con)
        try:
            found = catalog.pool_options(con, pool_id)
            if found is None:
                raise _ConflictError(
                    f"pool {pool_id} was removed or replaced by another process while ingesting"
                )
            (stored,) = found
            if int(json.loads(stored).get("next_row", 0)) != start:
                raise _ConflictError(f"pool {pool_id} is being ingested by another process at the same time")
            if first:
                ids = pa.table({"pair_id": pa.array(list(first), pa.int64())})
                for pid, row_index, path in catalog.duplicate_pairs(con, pool_id, ids):
                    rejects.append(_duplicate(first.pop(int(pid)), f"record {row_index} ({path})"))
            keep = sorted(first.values(), key=lambda r: r.index)
            if keep:
                table = pa.table(
                    [
                        [pool_id] * len(keep),
                        [r.pair_id for r in keep],
                        [r.index for r in keep],
                        [r.image_ref for r in keep],
                        [r.caption for r in keep],
                        [r.label for r in keep],
                        [r.width for r in keep],
                        [r.height for r in keep],
                    ],
                    schema=_PAIRS_SCHEMA,
                )
                catalog.insert_pairs(con, table)
            if rejects:
                table = pa.table(
                    [
                        [pool_id] * len(rejects),
                        [r.source_ref for r in rejects],
                        [r.reason for r in rejects],
                        [r.detail for r in rejects],
                    ],
                    schema=_REJECTS_SCHEMA,
                )
                catalog.insert_rejects(con, table)
            catalog.set_pool_options(con, pool_id, json.dumps({**json.loads(stored), "next_row": next_row}))
            store.commit(con)
        except BaseException:
            store.rollback(con)
            raise


def _duplicate(r: Checked, first: str) -> Checked:
    detail = f"{r.source_ref}: same image bytes and caption as {first} (pair_id {r.pair_id})"
    return Checked(
        r.index,
        r.source_ref,
        r.image_ref,
        r.caption,
        r.label,
        r.pair_id,
        reason="duplicate_pair",
        detail=detail,
    )


def pool_summary(ws: Workspace, name: str) -> IngestSummary:
    """Totals of an ingested pool (pairs, rejects per reason); raises PoolError for an unknown name."""
    with ws.connect(read_only=True) as con:
        rec = catalog.pool_record(con, name)
        if rec is None:
            raise PoolError(f"no pool named {name!r} in workspace {ws.root}")
        counts = catalog.reject_counts(con, rec.pool_id)
    _, book = _split_options(rec.options)
    return IngestSummary(
        rec.pool_id, name, rec.kind, rec.source, rec.format, rec.n_pairs, sum(counts.values()), counts,
        status=rec.status, encoding=book.get("encoding_detected"),
    )  # fmt: skip


def ingest(
    ws: Workspace,
    name: str,
    source: str | os.PathLike,
    kind: str = "pool",
    image_col: str = "filepath",
    caption_col: str = "title",
    label_col: str | None = None,
    fmt: str | None = None,
    progress: ProgressFn | None = None,
    *,
    sep: str | None = None,
    caption_template: str | None = None,
    json_caption_key: str = "caption",
    workers: int | None = None,
    chunk_size: int = 2000,
    encoding: str = "auto",
    allow_outside: Iterable[str | os.PathLike] = (),
    replace: bool = False,
) -> IngestSummary:
    """Read, check and record every pair of `source` as pool `name`; bad records go to `rejects`.

    fmt: one of 'csv', 'tsv', 'parquet', 'folder', 'wds', 'dicom' (None: detected). caption_template: DICOM
    tag template (default "{Modality} {BodyPartExamined} {StudyDescription}"). json_caption_key: the caption
    key of WebDataset json members; label_col also names the label key there. workers: checking processes
    (None: min(8, CPUs); 0: in this process). progress(done, total) is called after each committed chunk
    (total None when unknown). encoding: text encoding of CSV/TSV manifests, caption sidecars and WebDataset
    txt members ('auto': detected, see `chips_core.pools.text_encoding`). allow_outside: folders that image
    paths
    may resolve into besides the source's own folder (others are rejected as `outside_root`, unopened).
    replace: replace an existing pool of this name ingested otherwise (see the module docstring).
    Re-running resumes an interrupted ingest and is a no-op on a finished one. Raises IngestError (pool
    marked failed) when no pair is kept.
    """
    ws.check()
    if not name or not name.strip():
        raise PoolError("pool name is empty")
    if kind not in KINDS:
        raise PoolError(f"kind must be one of {KINDS}, got {kind!r}")
    if chunk_size < 1:
        raise PoolError(f"chunk_size must be >= 1, got {chunk_size}")
    src = _normalise_source(source)
    if fmt is None:
        fmt = detect_format(src)
    elif fmt not in FORMATS:
        raise PoolError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    elif not is_brace_pattern(src) and not os.path.exists(src):
        raise PoolError(f"input source {src} does not exist")
    if caption_template is not None:
        try:
            pools_dicom.check_template(caption_template)
        except ValueError as exc:
            raise PoolError(str(exc)) from None
    try:
        encoding = text_encoding.canonical(encoding)
    except text_encoding.EncodingError as exc:
        raise PoolError(str(exc)) from None
    if encoding != text_encoding.AUTO and "encoding" not in _FORMAT_OPTIONS[fmt]:
        raise PoolError(
            f"--encoding {encoding}: {fmt} sources carry typed text; encodings apply to csv/tsv manifests, "
            "caption sidecars (folder) and WebDataset txt members"
        )
    allowed = []
    for folder in allow_outside:
        path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
        if not os.path.isdir(path):
            raise PoolError(f"--allow-outside {folder}: not a folder")
        allowed.append(path)
    opts = ReaderOptions(
        image_col, caption_col, label_col, sep, caption_template, json_caption_key, encoding, tuple(allowed)
    )
    options = _options(fmt, opts)
    t0 = time.monotonic()
    # Whole-source problems (empty file, missing columns, no records) are found before a pool row is written.
    detected = _source_encoding(src, fmt, opts)
    read_opts = opts if detected is None else dataclasses.replace(opts, encoding=detected.encoding)
    if next(iter_records(src, fmt, read_opts), None) is None:
        raise PoolError(f"{src}: no records to ingest (a manifest without data rows, or no files) ({fmt})")
    pool_id, start, done, book, replaced = _open_pool(ws, name, kind, src, fmt, options, replace)
    if done:
        summary = pool_summary(ws, name)
        summary.already_done = True
        return summary
    if detected is not None:
        if book.get("encoding_detected") and start > 0:  # a resumed run reads the file as the first did
            enc = book["encoding_detected"].split(" ", 1)[0]
            read_opts = dataclasses.replace(opts, encoding=enc)
        else:
            _set_bookkeeping(ws, pool_id, encoding_detected=detected.describe())
    checker = None
    n_checked = 0
    try:
        records = (r for r in iter_records(src, fmt, read_opts) if r.index >= start)
        total = count_records(src, fmt, read_opts)
        checker = Checker(min(8, os.cpu_count() or 1) if workers is None else max(0, int(workers)))
        pending: tuple | None = None
        for chunk in _chunks(records, chunk_size):
            submitted = checker.submit(chunk)  # this chunk is checked while the previous one is written
            if pending is not None:
                n_checked += _flush(ws, pool_id, options, checker, pending, total, progress)
            pending = (chunk, submitted)
        if pending is not None:
            n_checked += _flush(ws, pool_id, options, checker, pending, total, progress)
    except _ConflictError:
        raise
    except Exception as exc:  # the source broke off mid-way, or the workspace failed: the pool is failed
        _mark(
            ws,
            pool_id,
            "failed",
            f"{type(exc).__name__}: {exc}" if not isinstance(exc, PoolError) else str(exc),
        )
        raise
    except BaseException:  # Ctrl-C, a cancelled job: resumable
        _mark(ws, pool_id, "interrupted", None)
        raise
    finally:
        if checker is not None:
            checker.close()
    summary = pool_summary(ws, name)
    summary.n_checked, summary.resumed_from, summary.seconds = n_checked, start, time.monotonic() - t0
    summary.replaced = replaced
    if summary.n_pairs == 0:
        reasons = ", ".join(
            f"{n} {r}" + (f" [see {_HINTS[r]}]" if r in _HINTS else "")
            for r, n in sorted(summary.reject_counts.items(), key=lambda kv: -kv[1])
        )
        read_as = f", text read as {summary.encoding}" if summary.encoding else ""
        msg = (
            f"{src}: no pairs kept, all {summary.n_rejects} records were rejected ({reasons}{read_as}); "
            f"pool {name!r} is marked failed (rejects: SELECT * FROM rejects WHERE pool_id = {pool_id}); "
            "fix the source or the flags and run again, or `chips rm` it"
        )
        _mark(ws, pool_id, "failed", msg)
        summary.status = "failed"
        raise IngestError(msg, summary)
    _mark(ws, pool_id, "ready", None)
    summary.status = "ready"
    return summary


def _source_encoding(src: str, fmt: str, opts: ReaderOptions) -> text_encoding.Detected | None:
    """The encoding the source's text is read with (None for parquet and DICOM: typed text)."""
    if "encoding" not in _FORMAT_OPTIONS[fmt]:
        return None
    if opts.encoding != text_encoding.AUTO:
        return text_encoding.Detected(opts.encoding, "given")
    if fmt in ("csv", "tsv"):
        try:
            return text_encoding.detect_file(src)
        except OSError as exc:
            raise PoolError(f"{src}: cannot read the manifest ({exc})") from None
    return text_encoding.detect_captions(caption_files(src, fmt, opts))


def _set_bookkeeping(ws: Workspace, pool_id: int, **values: object) -> None:
    with ws.connect() as con:
        store.begin(con)
        row = catalog.pool_options(con, pool_id)
        if row is not None:
            opts = json.loads(row[0]) if row[0] else {}
            for k, v in values.items():
                if v is None:
                    opts.pop(k, None)
                else:
                    opts[k] = v
            catalog.set_pool_options(con, pool_id, json.dumps(opts))
        store.commit(con)


def _mark(ws: Workspace, pool_id: int, status: str, error: str | None) -> None:
    """Record a pool's final status (and the error, when failed); never raises over the original error."""
    with contextlib.suppress(Exception):
        _set_bookkeeping(ws, pool_id, error=error)
        catalog.set_pool_status(ws, pool_id, status)


def _flush(
    ws: Workspace,
    pool_id: int,
    options: dict,
    checker: Checker,
    pending: tuple,
    total: int | None,
    progress: ProgressFn | None,
) -> int:
    chunk, submitted = pending
    results = checker.collect(chunk, submitted)
    next_row = chunk[-1].index + 1
    _write_chunk(ws, pool_id, options, results, chunk[0].index, next_row)
    if progress is not None:
        progress(next_row, total)
    return len(results)
