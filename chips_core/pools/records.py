"""Pool inputs: records, the stable pair_id, image loading for every reference kind, and validation.

A reader (`chips_core.pools.readers`) turns a source (manifest, image folder, WebDataset shards, DICOM
files) into `Record`s in a deterministic order; `check_record` reads and fully decodes one record's image
and returns a `Checked` row: either a valid pair (with its pair_id and size) or a reject with a short
stable reason code. `check_record` and `load_image` are module-level and picklable so they run in worker
processes (the ingest process pool, a DataLoader's workers).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from chips_core.pools import dicom
from chips_core.pools.text_encoding import decode_caption
from chips_core.workspace.store import WorkspaceError

#: Reject reason codes (stable strings stored in `rejects.reason`) and what they mean.
REASONS: dict[str, str] = {
    "missing_file": "the image file (or tar member) does not exist",
    "unreadable_file": "the file exists but cannot be read (a folder, no permission, a broken tar)",
    "zero_bytes": "the image file is empty",
    "corrupt_image": "the bytes are not a decodable image",
    "truncated_image": "the image data ends early",
    "decompression_bomb": "the image has more pixels than PIL's MAX_IMAGE_PIXELS safety limit",
    "bad_dicom": "a DICOM file without decodable pixel data",
    "malformed_row": "a manifest row whose number of fields differs from the header's",
    "bad_path": "the manifest's image path is empty or not valid UTF-8",
    "missing_caption": "no caption (no sidecar file, no txt/json member, no caption tag)",
    "empty_caption": "the caption is empty or whitespace only",
    "undecodable_caption": "the caption bytes are not valid in the source's text encoding (see --encoding)",
    "outside_root": "the path resolves (after symlinks) outside the source's folder; not opened",
    "bad_metadata": "a WebDataset sample's json member is not valid JSON",
    "worker_crash": "the process checking this record died on it (a decoder crash, out of memory)",
    "duplicate_pair": "the same image bytes with the same caption already appear earlier in the pool",
}

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_SEP = "::"


class PoolError(WorkspaceError):
    """A problem with a whole input source (missing columns, unknown format); the message names it."""


class ImageLoadError(PoolError):
    """An image reference that cannot be loaded; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One input pair as a reader found it, before its image is read.

    index: position in the source's deterministic order (resume key). source_ref: unique name of the
    record in the source (manifest row, file, shard::key). image_ref: absolute path or 'shard.tar::member'.
    caption: None when it comes from DICOM tags (`caption_template`). byte_range: (offset, size) of a tar
    member. reject: (reason, detail) when the reader already knows the record is bad.
    """

    index: int
    source_ref: str
    image_ref: str
    caption: str | None
    label: str | None = None
    caption_template: str | None = None
    byte_range: tuple[int, int] | None = None
    reject: tuple[str, str] | None = None


@dataclass(frozen=True)
class Checked:
    """The outcome of `check_record`: a valid pair (reason None) or a reject."""

    index: int
    source_ref: str
    image_ref: str
    caption: str | None
    label: str | None
    pair_id: int | None = None
    width: int | None = None
    height: int | None = None
    reason: str | None = None
    detail: str | None = None


def pair_id_from_digest(image_sha256: bytes, caption: str) -> int:
    """The pair_id contract (docs/ARCHITECTURE.md) from the image's sha256 digest and the caption."""
    h = hashlib.blake2b(image_sha256 + b"\0" + caption.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=True)


def pair_id(image_bytes: bytes, caption: str) -> int:
    """Stable signed int64 id of an (image bytes, caption) pair; identical on every machine and run."""
    return pair_id_from_digest(hashlib.sha256(image_bytes).digest(), caption)


def check_caption(caption: str | None) -> tuple[str, str] | None:
    """(reason, message) when a caption is unusable, else None. Captions are kept byte-exact."""
    if caption is None:
        return "missing_caption", "no caption"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes left by a non-UTF-8 file
        return "undecodable_caption", "caption is not valid UTF-8"
    if not caption.strip():
        return "empty_caption", "caption is empty or whitespace only"
    return None


def decode_caption_bytes(data: bytes, encoding: str = "utf-8") -> tuple[str | None, tuple[str, str] | None]:
    """Decode a caption file/member (surrounding whitespace stripped): UTF-8 with an optional BOM by
    default, else `encoding` ('auto': detected for this caption, see `chips_core.pools.text_encoding`)."""
    text, bad, _ = decode_caption(data, encoding)
    return text, bad


@dataclass(frozen=True)
class ReaderOptions:
    """How to read a source; part of a pool's identity (re-ingesting with other options is refused).

    encoding: text encoding of CSV/TSV manifests and caption sidecars / txt members ('auto': detected).
    allow_outside: folders (besides the source's own) that image and caption paths may resolve into.
    """

    image_col: str = "filepath"
    caption_col: str = "title"
    label_col: str | None = None
    sep: str | None = None
    caption_template: str | None = None
    json_caption_key: str = "caption"
    encoding: str = "auto"
    allow_outside: tuple[str, ...] = ()


class PathGuard:
    """Paths must resolve (symlinks followed, `..` collapsed) inside the source's folder or an allowed one.

    `check(path)` only resolves names (lstat / readlink); it never opens the file.
    """

    def __init__(self, root: str | os.PathLike | None, allow: tuple[str, ...] = ()) -> None:
        roots = ([os.path.realpath(root)] if root is not None else []) + [os.path.realpath(a) for a in allow]
        self.root = roots[0] if roots else None
        self.roots = tuple(dict.fromkeys(roots))

    def check(self, path: str) -> str | None:
        """None when `path` (a file path or 'shard.tar::member') may be read, else why not (one line)."""
        if self.root is None:
            return None
        file, _ = split_ref(path)
        real = os.path.realpath(file)
        for root in self.roots:
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return None
        return (
            f"{file} resolves to {real}, outside {self.root}; "
            "allow a folder with --allow-outside DIR (CLI) / allow_outside= (library)"
        )


def is_brace_pattern(source: str) -> bool:
    """True for a WebDataset brace pattern such as 'shards/part-{000..009}.tar'."""
    return "{" in source and "}" in source


def walk_files(root: Path) -> Iterator[Path]:
    """Files under root in a deterministic (sorted) order, hidden files skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


# --- reading image bytes --------------------------------------------------------------------------------

_TAR_INDEX: dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}


def _tar_member_range(shard: str, member: str) -> tuple[int, int]:
    """(offset, size) of a tar member; the shard's index is cached per process and keyed on mtime/size."""
    import tarfile

    st = os.stat(shard)
    key = (st.st_mtime_ns, st.st_size)
    cached = _TAR_INDEX.get(shard)
    if cached is None or cached[0] != key:
        index: dict[str, tuple[int, int]] = {}
        with tarfile.open(shard, mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    index[m.name] = (m.offset_data, m.size)
        cached = (key, index)
        _TAR_INDEX[shard] = cached
    try:
        return cached[1][member]
    except KeyError:
        raise FileNotFoundError(f"{shard} has no member {member!r}") from None


def split_ref(ref: str) -> tuple[str, str | None]:
    """'shard.tar::member' -> (shard, member); a plain path -> (path, None)."""
    if TAR_SEP in ref:
        shard, member = ref.split(TAR_SEP, 1)
        return shard, member
    return ref, None


def read_image_bytes(ref: str, byte_range: tuple[int, int] | None = None) -> bytes:
    """The raw bytes behind an image reference; raises ImageLoadError with a reason code.

    Tar members are read by seeking to their data (no extraction); `byte_range` skips the index lookup.
    """
    path, member = split_ref(ref)
    try:
        if member is not None and byte_range is None:
            byte_range = _tar_member_range(path, member)
        with open(path, "rb") as f:
            if byte_range is None:
                data = f.read()
            else:
                f.seek(byte_range[0])
                data = f.read(byte_range[1])
                if len(data) != byte_range[1]:
                    raise ImageLoadError("truncated_image", f"{ref}: tar member ends early")
    except FileNotFoundError as exc:
        raise ImageLoadError("missing_file", f"{ref}: file not found ({exc})") from None
    except ImageLoadError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # a directory, no permission, a broken tar
        raise ImageLoadError("unreadable_file", f"{ref}: cannot read ({exc})") from None
    if not data:
        raise ImageLoadError("zero_bytes", f"{ref}: file is empty (0 bytes)")
    return data


# --- decoding ---------------------------------------------------------------------------------------------


def decode_pil(data: bytes, ref: str) -> Image.Image:
    """Fully decode image bytes with PIL (verify + load), mapping every failure to a reason code.

    Raises ImageLoadError (with its reason code) for bytes PIL cannot decode or images over the pixel
    limit. `load_image` decodes files with it; the Ray engine decodes streamed WebDataset members."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass validation"
        )
    limit = Image.MAX_IMAGE_PIXELS
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; the explicit check below makes the limit
        # a rejection without touching the (process-global, thread-unsafe) warnings filters.
        with Image.open(io.BytesIO(data)) as im:
            if limit is not None and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"image size ({im.width * im.height} pixels) exceeds limit of {limit} pixels"
                )
            im.verify()  # checks PNG chunk CRCs without decoding
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Image.DecompressionBombError as exc:
        raise ImageLoadError("decompression_bomb", f"{ref}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageLoadError("corrupt_image", f"{ref}: not a recognised image format") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        reason = "truncated_image" if "truncat" in str(exc).lower() else "corrupt_image"
        raise ImageLoadError(reason, f"{ref}: {type(exc).__name__}: {exc}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; 16-bit and float greyscale are min-max scaled to 8 bits first."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        import numpy as np

        return dicom.to_pil_rgb(dicom.scale_to_uint8(np.asarray(im, dtype=np.float64)))
    return im.convert("RGB")


def is_dicom_ref(ref: str, data: bytes) -> bool:
    """A DICOM file by extension or by the 'DICM' magic at byte 128."""
    return ref.lower().endswith((".dcm", ".dicom")) or data[128:132] == b"DICM"


def load_image(ref: str) -> Image.Image:
    """Load any image reference as an RGB PIL image: a path, 'abs/shard.tar::member', or a DICOM file.

    Cheap to call from many processes: tar shards are opened per call (their member index is cached per
    process). Raises ImageLoadError (with `.reason`) for a bad reference.
    """
    data = read_image_bytes(ref)
    if is_dicom_ref(ref, data):
        try:
            return dicom.to_pil_rgb(dicom.decode(data).pixels)
        except dicom.DicomError as exc:
            raise ImageLoadError(exc.reason, f"{ref}: {exc}") from None
    return to_rgb(decode_pil(data, ref))


def check_record(rec: Record) -> Checked:
    """Check one record fully (read, decode, caption) and compute its pair_id; never raises on bad data."""

    def reject(reason: str, detail: str, caption: str | None = rec.caption) -> Checked:
        return Checked(
            rec.index, rec.source_ref, rec.image_ref, caption, rec.label, reason=reason, detail=detail
        )

    if rec.reject is not None:
        return reject(*rec.reject)
    if rec.caption is not None and (bad := check_caption(rec.caption)):
        return reject(bad[0], f"{rec.source_ref}: {bad[1]}")
    caption = rec.caption
    try:
        data = read_image_bytes(rec.image_ref, rec.byte_range)
        if is_dicom_ref(rec.image_ref, data):
            try:
                dcm = dicom.decode(data, rec.caption_template if caption is None else None)
            except dicom.DicomError as exc:
                raise ImageLoadError(exc.reason, f"{rec.image_ref}: {exc}") from None
            height, width = dcm.pixels.shape[:2]
            if caption is None:
                caption = dcm.caption
        else:
            with decode_pil(data, rec.image_ref) as im:
                width, height = im.size
    except ImageLoadError as exc:
        return reject(exc.reason, f"{rec.source_ref}: {exc}")
    if bad := check_caption(caption):
        return reject(bad[0], f"{rec.source_ref}: {bad[1]}", caption)
    assert caption is not None
    pid = pair_id(data, caption)
    return Checked(rec.index, rec.source_ref, rec.image_ref, caption, rec.label, pid, int(width), int(height))


def resolve_ref(ref: str, base: Path) -> str:
    """An absolute image reference: relative paths (and relative tar shards) are resolved against `base`."""
    path, member = split_ref(ref)
    absolute = os.path.abspath(os.path.join(base, os.path.expanduser(path)))
    return absolute if member is None else f"{absolute}{TAR_SEP}{member}"
