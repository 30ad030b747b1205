"""WebDataset shards as records: consecutive tar members sharing a key form one sample (key.jpg + key.txt,
or key.json with a configurable caption key); shards come from a .tar file, a folder or a brace pattern.
Image members are located by byte offset, so checking and loading them never extracts the tar."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from chips_core.pools.records import (
    TAR_SEP,
    PathGuard,
    ReaderOptions,
    Record,
    decode_caption_bytes,
    is_brace_pattern,
    walk_files,
)

_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "dcm")


def wds_shards(source: str) -> list[str]:
    """Absolute shard paths of a .tar file, a folder of shards, or a brace pattern (in order)."""
    if is_brace_pattern(source):
        from braceexpand import braceexpand

        return [os.path.abspath(p) for p in braceexpand(source)]
    path = Path(source)
    if path.is_dir():
        return [str(p.absolute()) for p in walk_files(path) if p.suffix.lower() == ".tar"]
    return [str(path.absolute())]


def _split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the basename's first '.', extension = the rest (lowercased)."""
    head, _, base = name.rpartition("/")
    if "." not in base.lstrip("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _wds_sample(
    i: int, shard: str, tf: tarfile.TarFile, key: str, members: dict, opts: ReaderOptions
) -> Record:
    ref = f"{shard}{TAR_SEP}{key}"
    image_ext = next((e for e in _WDS_IMAGE_EXTS if e in members), None)
    caption: str | None = None
    label: str | None = None
    bad: tuple[str, str] | None = None
    meta = None
    if "json" in members:
        raw = tf.extractfile(members["json"]).read()
        try:
            meta = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad = ("undecodable_caption", f"{ref}: json member is not valid UTF-8")
        except json.JSONDecodeError as exc:
            bad = ("bad_metadata", f"{ref}: json member is not valid JSON ({exc})")
    if bad is None:
        for ext in ("txt", "caption"):
            if ext in members:
                caption, bad = decode_caption_bytes(tf.extractfile(members[ext]).read(), opts.encoding)
                break
        else:
            if isinstance(meta, dict) and meta.get(opts.json_caption_key) is not None:
                caption = str(meta[opts.json_caption_key])
    if opts.label_col and isinstance(meta, dict) and meta.get(opts.label_col) is not None:
        label = str(meta[opts.label_col])
    elif "cls" in members:
        label = tf.extractfile(members["cls"]).read().decode("utf-8", "replace").strip() or None
    if image_ext is None:
        image_ref = ref
        bad = bad or (
            "missing_file",
            f"{ref}: sample has no image member (one of {', '.join(_WDS_IMAGE_EXTS)})",
        )
        return Record(i, ref, image_ref, caption, label, reject=bad)
    m = members[image_ext]
    image_ref = f"{shard}{TAR_SEP}{m.name}"
    if bad is None and caption is None:
        bad = ("missing_caption", f"{ref}: no txt member and no json key {opts.json_caption_key!r}")
    if bad is not None:
        return Record(i, ref, image_ref, caption, label, reject=bad)
    return Record(i, ref, image_ref, caption, label, byte_range=(m.offset_data, m.size))


def shard_guard(source: str, opts: ReaderOptions) -> PathGuard:
    """Shards of a folder or a brace pattern must resolve inside that folder (or an allowed one); a single
    .tar named as the source is allowed as it is."""
    if is_brace_pattern(source):
        return PathGuard(os.path.dirname(source.split("{", 1)[0]) or ".", opts.allow_outside)
    return PathGuard(source if os.path.isdir(source) else None, opts.allow_outside)


def read_wds(source: str, opts: ReaderOptions) -> Iterator[Record]:
    """Samples of WebDataset shards (consecutive members sharing a key); a broken shard is one reject."""
    guard = shard_guard(source, opts)
    i = 0
    for shard in wds_shards(source):
        if outside := guard.check(shard):
            ref = f"{shard}{TAR_SEP}<shard>"
            yield Record(i, ref, shard, None, reject=("outside_root", f"{shard}: {outside}"))
            i += 1
            continue
        if not os.path.exists(shard):
            yield Record(i, shard, shard, None, reject=("missing_file", f"{shard}: shard not found"))
            i += 1
            continue
        try:
            with tarfile.open(shard, mode="r:") as tf:
                key, members = None, {}
                for m in tf:
                    split = _split_key(m.name) if m.isfile() else None
                    if split is None:
                        continue
                    if split[0] != key and members:
                        yield _wds_sample(i, shard, tf, key, members, opts)
                        i += 1
                        members = {}
                    key = split[0]
                    members[split[1]] = m
                if members:
                    yield _wds_sample(i, shard, tf, key, members, opts)
                    i += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield Record(
                i,
                f"{shard}{TAR_SEP}<shard>",
                shard,
                None,
                reject=("unreadable_file", f"{shard}: broken tar shard ({type(exc).__name__}: {exc})"),
            )
            i += 1


def wds_caption_members(source: str, opts: ReaderOptions) -> Iterator[bytes]:
    """Raw bytes of the txt / caption members of a source's shards (shards outside its folder skipped)."""
    guard = shard_guard(source, opts)
    for shard in wds_shards(source):
        if guard.check(shard) or not os.path.isfile(shard):
            continue
        try:
            with tarfile.open(shard, mode="r:") as tf:
                for m in tf:
                    split = _split_key(m.name) if m.isfile() else None
                    if split is not None and split[1] in ("txt", "caption"):
                        yield tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError):
            continue
