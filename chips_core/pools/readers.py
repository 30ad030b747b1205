"""Readers: turn a source into `Record`s in a deterministic order (the order is the resume key).

Formats: 'csv' / 'tsv' / 'parquet' manifests (open_clip's `filepath` / `title` columns by default),
'folder' (images with caption sidecars x.jpg + x.txt), 'wds' (WebDataset .tar shards, see `pools_wds`),
'dicom' (DICOM files, caption from a template over tags). Readers only list files and read captions;
images are read and checked later by `pools.check_record` in worker processes.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

from chips_core.pools import dicom as pools_dicom
from chips_core.pools.records import (
    IMAGE_EXTS,
    PathGuard,
    PoolError,
    ReaderOptions,
    Record,
    decode_caption_bytes,
    is_brace_pattern,
    resolve_ref,
    walk_files,
)
from chips_core.pools.wds import read_wds, wds_caption_members

FORMATS = ("csv", "tsv", "parquet", "folder", "wds", "dicom")
_DICOM_EXTS = (".dcm", ".dicom")
_CSV_SEPS = (",", "\t", ";", "|")
_BATCH = 8192


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def detect_format(source: str) -> str:
    """Guess the format of a source path; raises PoolError naming it when no rule applies."""
    if is_brace_pattern(source):
        return "wds"
    path = Path(source)
    if not path.exists():
        raise PoolError(f"input source {source} does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".tab"):
            return "tsv"
        if suffix in (".csv", ".txt"):
            return "csv"
        if suffix in (".parquet", ".pq"):
            return "parquet"
        if suffix == ".tar":
            return "wds"
        if suffix in _DICOM_EXTS or _has_dicom_magic(path):
            return "dicom"
        raise PoolError(f"cannot tell the format of {source}: give fmt= (one of {', '.join(FORMATS)})")
    files = [p for p, _ in zip(walk_files(path), range(10000), strict=False)]
    if any(p.suffix.lower() == ".tar" for p in files):
        return "wds"
    if any(p.suffix.lower() == ".txt" for p in files):
        return "folder"
    if any(p.suffix.lower() in _DICOM_EXTS for p in files) or any(_has_dicom_magic(p) for p in files[:50]):
        return "dicom"
    if any(p.suffix.lower() in IMAGE_EXTS for p in files):
        return "folder"
    raise PoolError(f"{source} holds no images, caption sidecars, .tar shards or DICOM files")


# --- manifests -----------------------------------------------------------------------------------------


def _sniff_sep(path: Path, opts: ReaderOptions) -> str:
    """The separator whose header split contains the image and caption columns (else csv.Sniffer's)."""
    if opts.sep is not None:
        return opts.sep
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    with open(path, encoding=_text_codec(opts), errors="replace", newline="") as f:
        head = f.read(65536)
    first = head.splitlines()[0] if head else ""
    for sep in _CSV_SEPS:
        cols = next(csv.reader([first], delimiter=sep), [])
        if opts.image_col in cols and opts.caption_col in cols:
            return sep
    try:
        return csv.Sniffer().sniff(head, delimiters="".join(_CSV_SEPS)).delimiter
    except csv.Error:
        return ","


def _require_columns(path: Path, columns: list[str], opts: ReaderOptions) -> list[str]:
    wanted = [opts.image_col, opts.caption_col] + ([opts.label_col] if opts.label_col else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise PoolError(
            f"{path}: missing column(s) {missing}; found {columns[:20]}. "
            "Choose the columns with image_col / caption_col / label_col (CLI: --image-col, --caption-col)."
        )
    return wanted


def _text_codec(opts: ReaderOptions) -> str:
    """The codec a manifest is opened with: its (resolved) encoding, a UTF-8 BOM skipped."""
    enc = "utf-8" if opts.encoding == "auto" else opts.encoding
    return "utf-8-sig" if enc == "utf-8" else enc


def _manifest_record(
    i: int,
    path: Path,
    image,
    caption,
    label,
    base: Path,
    guard: PathGuard,
    encoding: str = "utf-8",  # noqa: ANN001
) -> Record:
    ref = f"{path}:row {i + 1}"
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return Record(
                i, ref, str(image), None, reject=("undecodable_caption", f"{ref}: caption is not UTF-8")
            )
    caption = "" if caption is None else str(caption)
    label = None if label is None or str(label) == "" else str(label)
    image = "" if image is None else str(image)
    if not image.strip():
        return Record(i, ref, image, caption, label, reject=("bad_path", f"{ref}: empty image path"))
    try:
        image.encode("utf-8")
    except UnicodeEncodeError:
        return Record(
            i,
            ref,
            image.encode("utf-8", "replace").decode(),
            caption.encode("utf-8", "replace").decode(),
            label,
            reject=("bad_path", f"{ref}: image path is not valid {encoding}"),
        )
    resolved = resolve_ref(image, base)
    if outside := guard.check(resolved):
        return Record(
            i, ref, resolved, _printable(caption), label, reject=("outside_root", f"{ref}: {outside}")
        )
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return Record(
            i,
            ref,
            resolved,
            _printable(caption),
            label,
            reject=("undecodable_caption", f"{ref}: caption is not valid {encoding}"),
        )
    return Record(i, ref, resolved, caption, label)


def _printable(text: str) -> str:
    """Text with undecodable bytes (surrogate escapes) shown as U+FFFD, storable as UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_csv_manifest(path: Path, opts: ReaderOptions) -> Iterator[Record]:
    """Rows of a CSV/TSV manifest (standard CSV quoting, as pandas and open_clip_train's CsvDataset read it).

    Invalid UTF-8 is kept as surrogate escapes so that only the affected row is rejected.
    """
    sep = _sniff_sep(path, opts)
    guard = PathGuard(path.parent, opts.allow_outside)
    encoding = "utf-8" if opts.encoding == "auto" else opts.encoding
    csv.field_size_limit(2**31 - 1)
    try:
        f = open(path, encoding=_text_codec(opts), errors="surrogateescape", newline="")  # noqa: SIM115
    except OSError as exc:
        raise PoolError(f"{path}: cannot read the manifest ({exc})") from None
    with f:
        rows = csv.reader(f, delimiter=sep)
        try:
            header = next(rows)
        except StopIteration:
            raise PoolError(f"{path}: the manifest is empty (no header row)") from None
        except csv.Error as exc:
            raise PoolError(f"{path}: malformed header ({exc})") from None
        cols = _require_columns(path, header, opts)
        where = [header.index(c) for c in cols] + ([None] if not opts.label_col else [])
        i = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:
                raise PoolError(f"{path}: malformed CSV after data row {i} ({exc})") from None
            if not row:  # blank line, skipped as pandas does
                continue
            if len(row) != len(header):
                ref = f"{path}:row {i + 1}"
                detail = f"{ref}: {len(row)} fields, the header has {len(header)} (separator {sep!r})"
                yield Record(i, ref, "", None, reject=("malformed_row", detail))
            else:
                image, caption, label = (row[k] if k is not None else None for k in where)
                yield _manifest_record(i, path, image, caption, label, path.parent, guard, encoding)
            i += 1


def read_parquet_manifest(path: Path, opts: ReaderOptions) -> Iterator[Record]:
    """Rows of a parquet manifest, read in batches."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise PoolError(f"{path}: cannot read the parquet manifest ({type(exc).__name__}: {exc})") from None
    cols = _require_columns(path, list(pf.schema_arrow.names), opts)
    guard = PathGuard(path.parent, opts.allow_outside)
    i = 0
    for batch in pf.iter_batches(batch_size=_BATCH, columns=cols):
        data = batch.to_pydict()
        labels = data[opts.label_col] if opts.label_col else [None] * batch.num_rows
        for image, caption, label in zip(data[opts.image_col], data[opts.caption_col], labels, strict=True):
            yield _manifest_record(i, path, image, caption, label, path.parent, guard)
            i += 1


# --- folders of images with sidecars, DICOM files ------------------------------------------------------


def read_folder(root: Path, opts: ReaderOptions) -> Iterator[Record]:
    """Images with caption sidecars (x.jpg + x.txt); a DICOM without a sidecar uses the caption template.

    Images and sidecars are symlinks at most into the folder itself or an `allow_outside` folder."""
    guard = PathGuard(root, opts.allow_outside)
    i = 0
    for path in walk_files(root):
        suffix = path.suffix.lower()
        if suffix not in IMAGE_EXTS and suffix not in _DICOM_EXTS:
            continue
        ref = str(path)
        side = path.with_suffix(".txt")
        outside = guard.check(ref) or (guard.check(str(side)) if os.path.lexists(side) else None)
        if outside:
            yield Record(i, ref, ref, None, reject=("outside_root", f"{ref}: {outside}"))
        elif side.exists():
            try:
                caption, bad = decode_caption_bytes(side.read_bytes(), opts.encoding)
            except OSError as exc:
                caption, bad = None, ("unreadable_file", f"cannot read caption file {side} ({exc})")
            yield Record(i, ref, ref, caption, reject=(bad[0], f"{side}: {bad[1]}") if bad else None)
        elif suffix in _DICOM_EXTS:
            template = opts.caption_template or pools_dicom.DEFAULT_TEMPLATE
            yield Record(i, ref, ref, None, caption_template=template)
        else:
            yield Record(
                i, ref, ref, None, reject=("missing_caption", f"{ref}: no caption sidecar {side.name}")
            )
        i += 1


def caption_files(source: str, fmt: str, opts: ReaderOptions) -> Iterator[bytes]:
    """Raw bytes of a source's caption files (folder sidecars, WebDataset txt members) in reading order,
    for `text_encoding.detect_captions`; files resolving outside the source's folder are never read."""
    if fmt == "wds":
        yield from wds_caption_members(source, opts)
        return
    if fmt != "folder":
        return
    root = Path(source)
    guard = PathGuard(root, opts.allow_outside)
    for path in walk_files(root):
        if path.suffix.lower() == ".txt" and not guard.check(str(path)):
            try:
                yield path.read_bytes()
            except OSError:
                continue


def read_dicom(source: Path, opts: ReaderOptions) -> Iterator[Record]:
    """DICOM files (a file or a folder; by extension or 'DICM' magic), captions from a tag template."""
    template = opts.caption_template or pools_dicom.DEFAULT_TEMPLATE
    paths = [source] if source.is_file() else walk_files(source)
    guard = PathGuard(None if source.is_file() else source, opts.allow_outside)  # a named file is allowed
    i = 0
    for path in paths:
        if outside := guard.check(str(path)):  # checked before the magic bytes are read
            yield Record(i, str(path), str(path), None, reject=("outside_root", f"{path}: {outside}"))
            i += 1
        elif path.suffix.lower() in _DICOM_EXTS or _has_dicom_magic(path):
            yield Record(i, str(path), str(path), None, caption_template=template)
            i += 1


def iter_records(source: str, fmt: str, opts: ReaderOptions) -> Iterator[Record]:
    """Records of a source in its deterministic order."""
    if fmt in ("csv", "tsv"):
        return read_csv_manifest(Path(source), opts if fmt == "csv" or opts.sep else _with_sep(opts, "\t"))
    if fmt == "parquet":
        return read_parquet_manifest(Path(source), opts)
    if fmt == "folder":
        return read_folder(Path(source), opts)
    if fmt == "dicom":
        return read_dicom(Path(source), opts)
    if fmt == "wds":
        return read_wds(source, opts)
    raise PoolError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")


def count_records(source: str, fmt: str, opts: ReaderOptions) -> int | None:
    """Number of records a source will yield when cheap to know (parquet metadata, a pass over a CSV of
    at most 512 MB, folder listings); None otherwise (WebDataset shards)."""
    if fmt in ("csv", "tsv"):
        path = Path(source)
        if path.stat().st_size > 512 * 2**20:
            return None
        sep = _sniff_sep(path, opts if fmt == "csv" or opts.sep else _with_sep(opts, "\t"))
        csv.field_size_limit(2**31 - 1)
        try:
            with open(path, encoding=_text_codec(opts), errors="surrogateescape", newline="") as f:
                return max(0, sum(1 for row in csv.reader(f, delimiter=sep) if row) - 1)
        except (OSError, csv.Error):  # the reader reports the problem with its own message
            return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(source).metadata.num_rows)
        except Exception:  # the reader reports the problem with its own message
            return None
    if fmt == "folder":
        exts = IMAGE_EXTS + _DICOM_EXTS
        return sum(1 for p in walk_files(Path(source)) if p.suffix.lower() in exts)
    if fmt == "dicom":
        return sum(1 for _ in read_dicom(Path(source), opts))
    return None


def _with_sep(opts: ReaderOptions, sep: str) -> ReaderOptions:
    from dataclasses import replace

    return replace(opts, sep=sep)
