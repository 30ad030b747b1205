"""Ingest an input source into the workspace: `pools`, `pairs` and `rejects` rows.

Records are checked (read + fully decoded) in a process pool, chunk by chunk; each chunk's pairs, rejects
and the resume point (`pools.options.next_row`) are committed in ONE short transaction, so a killed run
resumes on re-run with nothing lost and nothing duplicated, and a dashboard can read between chunks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from chips_core import pools_dicom
from chips_core.pools import REASONS, Checked, PoolError
from chips_core.pools_parallel import Checker
from chips_core.pools_readers import (
    FORMATS,
    ReaderOptions,
    count_records,
    detect_format,
    is_brace_pattern,
    iter_records,
)
from chips_core.store import Workspace

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
    "csv": ("image_col", "caption_col", "label_col", "sep"),
    "tsv": ("image_col", "caption_col", "label_col", "sep"),
    "parquet": ("image_col", "caption_col", "label_col"),
    "folder": ("caption_template",),
    "dicom": ("caption_template",),
    "wds": ("json_caption_key", "label_col"),
}


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

    def format(self) -> str:
        """A short multi-line report for the command line."""
        head = f"pool {self.name!r} ({self.kind}, {self.fmt}) from {self.source}"
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
    return {k: getattr(opts, k) for k in _FORMAT_OPTIONS[fmt]}


def _chunks(records: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_pool(
    ws: Workspace, name: str, kind: str, source: str, fmt: str, options: dict
) -> tuple[int, int, bool]:
    """(pool_id, next_row, done): the existing pool of this name (same source and options) or a new one."""
    with ws.connect() as con:
        rows = con.execute(
            "SELECT pool_id, kind, source, format, options, status FROM pools WHERE name = ?", [name]
        ).fetchall()
        row = rows[0] if rows else None
        if row is None:
            pool_id = ws.next_id(con)
            try:
                con.execute(
                    "INSERT INTO pools (pool_id, name, kind, source, format, options, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [pool_id, name, kind, source, fmt, json.dumps({**options, "next_row": 0}), "ingesting"],
                )
            except duckdb.ConstraintException:
                raise PoolError(
                    f"pool {name!r} was just created by another process; run again to resume it"
                ) from None
            return pool_id, 0, False
    pool_id, old_kind, old_source, old_fmt, old_options, status = row
    old = json.loads(old_options) if old_options else {}
    next_row = int(old.pop("next_row", 0))
    if (old_source, old_fmt) != (source, fmt):
        raise PoolError(
            f"pool {name!r} already exists with source {old_source} ({old_fmt}); "
            f"refusing to add {source} ({fmt}) under the same name: choose another name"
        )
    if old != options or old_kind != kind:
        raise PoolError(
            f"pool {name!r} was ingested as {old_kind} with options {old}; "
            f"now asked as {kind} with {options}: choose another name"
        )
    return int(pool_id), next_row, status == "ready"


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
        con.execute("BEGIN TRANSACTION")
        try:
            ((stored,),) = con.execute("SELECT options FROM pools WHERE pool_id = ?", [pool_id]).fetchall()
            if int(json.loads(stored).get("next_row", 0)) != start:
                raise PoolError(f"pool {pool_id} is being ingested by another process at the same time")
            if first:
                ids = pa.table({"pair_id": pa.array(list(first), pa.int64())})
                con.register("chunk_ids", ids)
                for pid, row_index, path in con.execute(
                    "SELECT p.pair_id, p.row_index, p.filepath FROM pairs p JOIN chunk_ids c USING (pair_id) "
                    "WHERE p.pool_id = ?",
                    [pool_id],
                ).fetchall():
                    rejects.append(_duplicate(first.pop(int(pid)), f"record {row_index} ({path})"))
                con.unregister("chunk_ids")
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
                con.register("chunk_pairs", table)
                con.execute("INSERT INTO pairs SELECT * FROM chunk_pairs")
                con.unregister("chunk_pairs")
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
                con.register("chunk_rejects", table)
                con.execute(
                    "INSERT OR IGNORE INTO rejects (pool_id, source_ref, reason, detail) "
                    "SELECT pool_id, source_ref, reason, detail FROM chunk_rejects"
                )
                con.unregister("chunk_rejects")
            con.execute(
                "UPDATE pools SET options = ? WHERE pool_id = ?",
                [json.dumps({**options, "next_row": next_row}), pool_id],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
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
        row = con.execute("SELECT pool_id, kind, source, format FROM pools WHERE name = ?", [name]).fetchone()
        if row is None:
            raise PoolError(f"no pool named {name!r} in workspace {ws.root}")
        pool_id = int(row[0])
        n_pairs = int(con.execute("SELECT count(*) FROM pairs WHERE pool_id = ?", [pool_id]).fetchone()[0])
        counts = dict(
            con.execute(
                "SELECT reason, count(*) FROM rejects WHERE pool_id = ? GROUP BY reason", [pool_id]
            ).fetchall()
        )
    counts = {str(k): int(v) for k, v in counts.items()}
    return IngestSummary(pool_id, name, row[1], row[2], row[3], n_pairs, sum(counts.values()), counts)


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
) -> IngestSummary:
    """Read, check and record every pair of `source` as pool `name`; bad records go to `rejects`.

    fmt: one of 'csv', 'tsv', 'parquet', 'folder', 'wds', 'dicom' (None: detected). caption_template: DICOM
    tag template (default "{Modality} {BodyPartExamined} {StudyDescription}"). json_caption_key: the caption
    key of WebDataset json members; label_col also names the label key there. workers: checking processes
    (None: min(8, CPUs); 0: in this process). progress(done, total) is called after each committed chunk
    (total None when unknown). Re-running resumes an interrupted ingest and is a no-op on a finished one.
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
    opts = ReaderOptions(image_col, caption_col, label_col, sep, caption_template, json_caption_key)
    options = _options(fmt, opts)
    t0 = time.monotonic()
    pool_id, start, done = _open_pool(ws, name, kind, src, fmt, options)
    if done:
        summary = pool_summary(ws, name)
        summary.already_done = True
        return summary
    records = (r for r in iter_records(src, fmt, opts) if r.index >= start)
    total = count_records(src, fmt, opts)
    checker = Checker(min(8, os.cpu_count() or 1) if workers is None else max(0, int(workers)))
    n_checked = 0
    try:
        pending: tuple | None = None
        for chunk in _chunks(records, chunk_size):
            submitted = checker.submit(chunk)  # this chunk is checked while the previous one is written
            if pending is not None:
                n_checked += _flush(ws, pool_id, options, checker, pending, total, progress)
            pending = (chunk, submitted)
        if pending is not None:
            n_checked += _flush(ws, pool_id, options, checker, pending, total, progress)
    finally:
        checker.close()
    with ws.connect() as con:
        con.execute("UPDATE pools SET status = 'ready' WHERE pool_id = ?", [pool_id])
    summary = pool_summary(ws, name)
    summary.n_checked, summary.resumed_from, summary.seconds = n_checked, start, time.monotonic() - t0
    return summary


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
