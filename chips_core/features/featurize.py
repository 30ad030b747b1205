"""Featurization: run the encoders ONCE per pair and cache the pre-projection features h, t (METHOD.md §1).

A feature run belongs to (pool, model). Its folder `features/<run_id>/` holds
- `run.json`: shard size, model identity, widths (written once, atomically);
- `pairs.parquet`: the pool's pairs frozen in store order (pos, pair_id, filepath, caption), so shards are
  fixed ranges of positions and workers read their rows without touching the workspace database;
- `shard-NNNNN-{h,t,ids}.npy`: fp16 features and int64 pair ids of positions [N·S, (N+1)·S), each file
  written atomically; a shard exists iff its row is in `feature_shards` (written after the files).
- `part-NNNNN-PPPP-{h,t,ids}.npy` + `part-NNNNN-PPPP.json`: checkpoints of the shard being written, one
  every `checkpoint_s` seconds (default 30), the json (positions [start, end) and rejects) written last;
  merged into the shard files when the shard closes and then deleted.
A killed run resumes on re-run (same run, completed shards skipped, an incomplete shard continued from its
last checkpoint), so no row is lost or duplicated and at most `checkpoint_s` seconds of encoding (plus the
batch in flight) are redone, at any pool size. Readers only ever see whole shards. Images that fail to
load go to `rejects` and are left out of the shard's ids. `FeatureStore` reads a run back as the
FeatureSource protocol of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import torch

from chips_core.pools import records
from chips_core.workspace import catalog, store
from chips_core.workspace.store import Workspace, WorkspaceError, atomic_path, atomic_write_bytes

if TYPE_CHECKING:  # the model zoo (open_clip) is imported by what encodes, not by readers of a feature store
    from chips_core.features.models import LoadedModel

SHARD_SIZE = 8192
CHECKPOINT_S = 30.0  # seconds of encoding between checkpoints of the shard being written
_OPEN_SHARDS = 128
_JPEG_MAGIC = b"\xff\xd8\xff"


class FeaturizeError(WorkspaceError):
    """A featurization problem with a message meant for the user."""


@dataclass(frozen=True)
class Progress:
    """Progress of one featurize call: pairs done (incl. shards done earlier) out of the pool's total."""

    done: int
    total: int
    pairs_per_s: float  # measured over this call
    eta_s: float | None
    shards_done: int
    n_shards: int


ProgressFn = Callable[[Progress], None]


# --- the run and its manifest -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """A feature run as featurize (or a distributed engine) works on it."""

    run_id: int
    pool_id: int
    model_id: int
    dir: Path
    shard_size: int
    n_total: int  # pairs in the pool when the run started
    d_v: int
    d_t: int

    @property
    def manifest(self) -> Path:
        return self.dir / "pairs.parquet"

    @property
    def n_shards(self) -> int:
        return -(-self.n_total // self.shard_size)

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """Positions [start, end) of a shard in the frozen pool order."""
        start = shard_index * self.shard_size
        return start, min(start + self.shard_size, self.n_total)

    def shard_paths(self, shard_index: int) -> dict[str, Path]:
        return {k: self.dir / f"shard-{shard_index:05d}-{k}.npy" for k in ("h", "t", "ids")}


def open_run(ws: Workspace, pool_name: str, loaded: LoadedModel, shard_size: int = SHARD_SIZE) -> RunInfo:
    """The unfinished or finished run of (pool, model), or a new one; freezes the pool order on creation.

    A resumed run keeps the shard size it started with (recorded in run.json).
    """
    ws.check()
    if shard_size < 1:
        raise FeaturizeError(f"shard_size must be >= 1, got {shard_size}")
    from chips_core.features.models import register_model

    model_id = register_model(ws, loaded.identity)
    with ws.connect() as con:
        rec = catalog.pool_record(con, pool_name)
        if rec is None:
            names = [n for n, _ in catalog.pool_names(con)]
            raise FeaturizeError(
                f"no pool named {pool_name!r} in {ws.root} (pools: {', '.join(names) or 'none'})"
            )
        pool_id, status = rec.pool_id, rec.status
        if status != "ready":
            raise FeaturizeError(
                f"pool {pool_name!r} is not ready (status {status!r}); finish ingesting it first"
            )
        run = catalog.find_feature_run(con, pool_id, model_id)
        if run is None:
            run_id = ws.next_id(con)
            run_dir = ws.root / "features" / str(run_id)
            catalog.insert_feature_run(con, run_id, pool_id, model_id, str(run_dir), loaded.d_v, loaded.d_t)
        else:
            run_id, run_dir = int(run[0]), Path(run[1])
    meta_path = run_dir / "run.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:  # a new run, or one killed before its run.json was written
        with ws.connect() as con:
            n_total = catalog.count_pairs(con, pool_id)
        meta = {
            "run_id": run_id, "pool": pool_name, "pool_id": pool_id, "model_id": model_id,
            "model": asdict(loaded.identity), "shard_size": shard_size, "n_total": int(n_total),
            "d_v": loaded.d_v, "d_t": loaded.d_t, "dtype": "float16", "format": 1,
        }  # fmt: skip
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    info = RunInfo(
        run_id,
        pool_id,
        model_id,
        run_dir,
        int(meta["shard_size"]),
        int(meta["n_total"]),
        meta["d_v"],
        meta["d_t"],
    )
    if not info.manifest.exists():
        _write_manifest(ws, info)
    return info


@contextlib.contextmanager
def run_lock(info: RunInfo, wait_s: float = 15.0) -> Iterator[None]:
    """Exclusive right to write a run's shards (flock: released by the OS when a killed process is gone).

    Waits `wait_s` for the lock (the DataLoader workers of a killed run take a few seconds to exit), then
    clears the temporaries a killed writer left behind.
    """
    import fcntl

    deadline = time.monotonic() + wait_s
    f = open(info.dir / "lock", "w")  # noqa: SIM115 - held for the duration of the context
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FeaturizeError(
                        f"feature run {info.run_id} ({info.dir}) is being written by another process"
                    ) from None
                time.sleep(0.5)
        for stray in info.dir.glob(".*"):  # temporaries of writes a killed process left behind
            with contextlib.suppress(FileNotFoundError):
                stray.unlink()
        yield
    finally:
        f.close()


def _write_manifest(ws: Workspace, info: RunInfo) -> None:
    with atomic_path(info.manifest) as tmp, ws.connect() as con:
        catalog.write_manifest(con, info.pool_id, tmp)


def done_shards(ws: Workspace, run_id: int) -> set[int]:
    """Indices of the shards with a completion record."""
    with ws.connect() as con:
        return catalog.done_shard_indexes(con, run_id)


def read_rows(
    manifest: Path, start: int, end: int, con: duckdb.DuckDBPyConnection | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """(pair_ids, filepaths, captions) of positions [start, end) of a run's frozen pool order.

    Pass an open in-memory connection (`duckdb.connect()`) when reading many batches: opening one
    costs more than the read.
    """
    return catalog.manifest_rows(manifest, start, end, con)


def write_shard(
    ws: Workspace, info: RunInfo, shard_index: int, ids: np.ndarray, h: np.ndarray, t: np.ndarray,
    rejects: list[tuple[str, str, str]] = (),
) -> None:  # fmt: skip
    """Write one shard's files atomically, then its rejects (filepath, reason, detail) and completion row."""
    if not (len(ids) == len(h) == len(t)):
        raise ValueError(f"shard {shard_index}: {len(ids)} ids, {len(h)} h rows, {len(t)} t rows")
    paths = info.shard_paths(shard_index)
    for key, arr in (("h", h.astype(np.float16)), ("t", t.astype(np.float16)), ("ids", ids.astype(np.int64))):
        with atomic_path(paths[key]) as tmp:
            np.save(tmp, arr)
    with ws.connect() as con:
        store.begin(con)
        catalog.insert_rejects(
            con,
            [
                (info.pool_id, ref, reason, f"featurize run {info.run_id}: {detail}")
                for ref, reason, detail in rejects
            ],
        )
        catalog.insert_feature_shard(
            con, info.run_id, shard_index, len(ids), info.shard_range(shard_index)[0]
        )
        store.commit(con)


def finish_run(ws: Workspace, info: RunInfo) -> None:
    """Mark the run done once every shard has its completion record."""
    missing = set(range(info.n_shards)) - done_shards(ws, info.run_id)
    if missing:
        raise FeaturizeError(f"feature run {info.run_id}: shards {sorted(missing)[:10]} are not complete")
    catalog.finish_feature_run(ws, info.run_id)


# --- loading and preprocessing batches ----------------------------------------------------------------


class _Rows(torch.utils.data.Sampler):
    """Yields each planned batch with its manifest rows, read in the MAIN process.

    DataLoader workers are forked; they only load images and never open DuckDB (a DuckDB instance
    inherited through fork can deadlock the child).
    """

    def __init__(self, manifest: Path, plan: list[tuple[int, int, int]]) -> None:
        self.manifest, self.plan = manifest, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[tuple]:
        with duckdb.connect() as con:
            for shard, start, end in self.plan:
                yield (shard, end - start, *read_rows(self.manifest, start, end, con), end)


class _Batches(torch.utils.data.Dataset):
    """Item = one batch of one shard (from `_Rows`): images loaded and preprocessed, captions tokenized.

    With `raw_jpeg`, JPEG files are returned as bytes for GPU decoding; other images are decoded here.
    """

    def __init__(self, loaded: LoadedModel, raw_jpeg: bool) -> None:
        self.raw_jpeg, self.preprocess, self.tokenizer = raw_jpeg, loaded.preprocess, loaded.tokenizer

    def __getitem__(self, item: tuple) -> dict:
        shard, n, ids, refs, captions, end = item
        keep, images, jpegs, rejects = [], [], [], []
        for j, ref in enumerate(refs):
            try:
                if self.raw_jpeg:
                    data = records.read_image_bytes(ref)
                    if data[:3] == _JPEG_MAGIC and not records.is_dicom_ref(ref, data):
                        jpegs.append((len(keep), torch.frombuffer(bytearray(data), dtype=torch.uint8)))
                        keep.append(j)
                        continue
                images.append((len(keep), self.preprocess(records.load_image(ref))))
                keep.append(j)
            except Exception as exc:  # noqa: BLE001 - any failure of one image rejects that image only
                rejects.append((ref, getattr(exc, "reason", "load_error"), f"{type(exc).__name__}: {exc}"))
        tokens = self.tokenizer([captions[j] for j in keep]) if keep else None
        return {"shard": shard, "n": n, "end": end, "ids": ids[keep], "images": images, "jpegs": jpegs,
                "tokens": tokens, "rejects": rejects}  # fmt: skip


def _gpu_images(batch: dict, loaded: LoadedModel, device: torch.device) -> torch.Tensor:
    """JPEGs decoded and preprocessed on the GPU, merged with the images the workers decoded."""
    out = torch.empty((len(batch["images"]) + len(batch["jpegs"]), 3, *loaded.image_size), device=device)
    for k, img in batch["images"]:
        out[k] = img.to(device, non_blocking=True)
    if batch["jpegs"]:
        out[[k for k, _ in batch["jpegs"]]] = loaded.decode_jpegs([b for _, b in batch["jpegs"]])
    return out


# --- featurize --------------------------------------------------------------------------------------


def featurize(
    ws: Workspace,
    pool_name: str,
    model: str | LoadedModel = "chips-tiny-vit",
    pretrained: str | None = None,
    *,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    shard_size: int = SHARD_SIZE,
    gpu_decode: bool | None = None,
    progress: ProgressFn | None = None,
    checkpoint_s: float = CHECKPOINT_S,
) -> int:
    """Featurize pool `pool_name` with a model (name/checkpoint/hf-hub id + pretrained, or a LoadedModel).

    Returns the feature run id; a finished run of the same (pool, model) is returned as is, an unfinished
    one is resumed. On CUDA the encoders run under bf16 autocast; `gpu_decode` (default: on with CUDA)
    decodes JPEG files with nvJPEG. `num_workers` DataLoader processes load and preprocess images.
    The shard being written is checkpointed every `checkpoint_s` seconds: a killed run loses at most that.
    """
    if batch_size < 1:
        raise FeaturizeError(f"batch_size must be >= 1, got {batch_size}")
    from chips_core.features.models import LoadedModel, load_model, resolve_device

    dev = resolve_device(device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, pretrained, device=dev)
    if loaded.device != dev:
        loaded.model.to(dev)
        loaded.device = dev
    info = open_run(ws, pool_name, loaded, shard_size)
    with run_lock(info):
        _featurize_run(ws, info, loaded, dev, batch_size, num_workers, gpu_decode, progress, checkpoint_s)
    return info.run_id


def _part_paths(info: RunInfo, shard: int, part: int) -> dict[str, Path]:
    stem = f"part-{shard:05d}-{part:04d}"
    return {**{k: info.dir / f"{stem}-{k}.npy" for k in ("h", "t", "ids")}, "json": info.dir / f"{stem}.json"}


def _drop_parts(info: RunInfo, shard: int) -> None:
    for path in info.dir.glob(f"part-{shard:05d}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _load_parts(info: RunInfo, shard: int) -> tuple[list[dict], int]:
    """The checkpoints of an unfinished shard that continue each other from its start: (parts, next
    position); anything else of that shard (a part without its json, a gap) is deleted."""
    parts, pos = [], info.shard_range(shard)[0]
    for p in itertools.count():
        paths = _part_paths(info, shard, p)
        if not paths["json"].exists():
            break
        meta = json.loads(paths["json"].read_text())
        if meta["start"] != pos:
            break
        arrays = {k: np.load(paths[k]) for k in ("h", "t", "ids")}
        parts.append({**arrays, "rejects": [tuple(r) for r in meta["rejects"]]})
        pos = int(meta["end"])
    keep = {str(path) for q in range(len(parts)) for path in _part_paths(info, shard, q).values()}
    for path in info.dir.glob(f"part-{shard:05d}-*"):
        if str(path) not in keep:
            path.unlink()
    return parts, pos


def _write_part(info: RunInfo, shard: int, part: int, start: int, end: int, pieces: list[dict]) -> dict:
    """Checkpoint the encoded batches `pieces` (positions [start, end) of `shard`); json last."""
    merged = _merge(info, pieces)
    paths = _part_paths(info, shard, part)
    for key in ("h", "t", "ids"):
        with atomic_path(paths[key]) as tmp:
            np.save(tmp, merged[key])
    meta = {"shard": shard, "part": part, "start": start, "end": end, "rejects": merged["rejects"]}
    atomic_write_bytes(paths["json"], json.dumps(meta).encode())
    return merged


def _merge(info: RunInfo, parts: list[dict]) -> dict:
    full = [p for p in parts if p["h"] is not None]
    return {
        "ids": np.concatenate([p["ids"] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64),
        "h": np.concatenate([p["h"] for p in full]) if full else np.zeros((0, info.d_v), np.float16),
        "t": np.concatenate([p["t"] for p in full]) if full else np.zeros((0, info.d_t), np.float16),
        "rejects": [list(r) for p in parts for r in p["rejects"]],
    }


def _featurize_run(
    ws: Workspace, info: RunInfo, loaded: LoadedModel, dev: torch.device, batch_size: int, num_workers: int,
    gpu_decode: bool | None, progress: ProgressFn | None, checkpoint_s: float = CHECKPOINT_S,
) -> None:  # fmt: skip
    """The shards of `info` that have no completion record yet, in order (each continued from its last
    checkpoint), then the run's done mark."""
    done = done_shards(ws, info.run_id)
    for s in done:
        _drop_parts(info, s)
    todo = [s for s in range(info.n_shards) if s not in done]
    saved: dict[int, list[dict]] = {}
    resume: dict[int, int] = {}
    for s in todo:
        saved[s], resume[s] = _load_parts(info, s)
    for s in [s for s in todo if resume[s] >= info.shard_range(s)[1]]:  # killed just before closing it
        _flush_shard(ws, info, s, saved.pop(s))
        _drop_parts(info, s)
        todo.remove(s)
        done.add(s)
    plan = [
        (s, b, min(b + batch_size, info.shard_range(s)[1]))
        for s in todo
        for b in range(resume[s], info.shard_range(s)[1], batch_size)
    ]
    raw_jpeg = dev.type == "cuda" and loaded.gpu_preprocess_supported() if gpu_decode is None else gpu_decode
    if raw_jpeg and (dev.type != "cuda" or not loaded.gpu_preprocess_supported()):
        raise FeaturizeError(
            "gpu_decode needs device 'cuda' and a model whose preprocessing runs on the GPU "
            f"(device {dev}, model {loaded.identity.label()})"
        )
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers in forked workers
    loader = torch.utils.data.DataLoader(
        _Batches(loaded, raw_jpeg), sampler=_Rows(info.manifest, plan), batch_size=None,
        num_workers=num_workers, pin_memory=dev.type == "cuda", prefetch_factor=4 if num_workers else None,
    )  # fmt: skip
    tracker = _Tracker(info, done, progress, resumed=sum(resume[s] - info.shard_range(s)[0] for s in todo))
    remaining = {s: len(range(resume[s], info.shard_range(s)[1], batch_size)) for s in todo}
    pending: list[dict] = []
    last_checkpoint = time.monotonic()
    for batch in loader:
        pending.append(encode_batch(batch, loaded, dev, raw_jpeg))
        s = batch["shard"]
        remaining[s] -= 1
        if remaining[s] == 0:
            _flush_shard(ws, info, s, saved.pop(s) + pending)
            _drop_parts(info, s)
            pending, last_checkpoint = [], time.monotonic()
        elif time.monotonic() - last_checkpoint >= checkpoint_s:
            saved[s].append(_write_part(info, s, len(saved[s]), resume[s], batch["end"], pending))
            resume[s], pending, last_checkpoint = batch["end"], [], time.monotonic()
        tracker.batch_done(batch["n"], shard_finished=remaining[s] == 0)
    finish_run(ws, info)


def encode_batch(batch: dict, loaded: LoadedModel, dev: torch.device, raw_jpeg: bool) -> dict:
    """Encode one batch of preprocessed rows into fp16 features: {"ids", "h", "t", "rejects"}.

    `batch` holds "ids" (pair ids), "images" ((row, preprocessed CHW tensor) pairs), "jpegs" ((row, raw
    JPEG bytes) pairs, decoded on the GPU; only read when `raw_jpeg`), "tokens" and "rejects" (passed
    through). Runs the encoders in
    inference mode (bf16 autocast on CUDA); raises FeaturizeError on non-finite features. The local
    featurize and the Ray encoder actors both encode with it, so their features are the same.
    """
    ids = batch["ids"]
    if len(ids) == 0:
        return {"ids": ids, "h": None, "t": None, "rejects": batch["rejects"]}
    if raw_jpeg:
        images = _gpu_images(batch, loaded, dev)
    else:
        images = torch.stack([img for _, img in batch["images"]]).to(dev, non_blocking=True)
    tokens = batch["tokens"].to(dev, non_blocking=True)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        h, t = loaded.encode(images, tokens)
    h, t = h.to(torch.float16).cpu().numpy(), t.to(torch.float16).cpu().numpy()
    bad = ~(np.isfinite(h).all(1) & np.isfinite(t).all(1))
    if bad.any():
        raise FeaturizeError(
            f"{loaded.identity.label()}: non-finite features (beyond the fp16 range?) for pair ids "
            f"{ids[bad][:5].tolist()}"
        )
    return {"ids": ids, "h": h, "t": t, "rejects": batch["rejects"]}


def _flush_shard(ws: Workspace, info: RunInfo, shard: int, parts: list[dict]) -> None:
    m = _merge(info, parts)
    write_shard(ws, info, shard, m["ids"], m["h"], m["t"], [tuple(r) for r in m["rejects"]])


class _Tracker:
    """Progress reports (done/total, pairs/s over this call, ETA): at most every `every_s`, and per shard."""

    def __init__(
        self, info: RunInfo, done: set[int], fn: ProgressFn | None, every_s: float = 0.5, resumed: int = 0
    ) -> None:
        self.info, self.fn, self.every_s = info, fn, every_s
        self.t0 = self.last = time.monotonic()
        self.n_shards_done = len(done)
        self.done = sum(info.shard_range(s)[1] - info.shard_range(s)[0] for s in done) + resumed
        self.here = 0
        self._report()

    def batch_done(self, n: int, shard_finished: bool) -> None:
        self.done, self.here = self.done + n, self.here + n
        self.n_shards_done += int(shard_finished)
        if shard_finished or time.monotonic() - self.last >= self.every_s:
            self._report()

    def _report(self) -> None:
        if self.fn is None:
            return
        self.last = time.monotonic()
        rate = self.here / max(self.last - self.t0, 1e-9)
        left = self.info.n_total - self.done
        eta = left / rate if rate > 0 else (0.0 if left == 0 else None)
        self.fn(Progress(self.done, self.info.n_total, rate, eta, self.n_shards_done, self.info.n_shards))


# --- reading features back --------------------------------------------------------------------------


class FeatureStore:
    """A feature run as a FeatureSource: pair ids in store order, random row access, shard iteration.

    Store order = shard order, and within a shard the pool order minus rejected rows. Arrays are
    memory-mapped; `rows` reads only the rows asked for. fp16 as stored (cast before doing math).
    """

    def __init__(self, ws: Workspace, run_id: int, allow_partial: bool = False) -> None:
        with ws.connect(read_only=True) as con:
            row = catalog.feature_run_row(con, run_id)
            if row is None:
                raise FeaturizeError(f"no feature run {run_id} in {ws.root}")
            shards = catalog.feature_shards(con, run_id)
        self.run_id, self.pool_id, self.model_id, self.status = run_id, int(row[0]), int(row[1]), row[2]
        self.dir, self.d_v, self.d_t = Path(row[3]), int(row[4]), int(row[5])
        if self.status != "done" and not allow_partial:
            raise FeaturizeError(
                f"feature run {run_id} is not finished (status {self.status!r}); re-run featurize"
            )
        self._shards = [int(s) for s, _ in shards]
        self._offsets = np.concatenate([[0], np.cumsum([int(n) for _, n in shards])]).astype(np.int64)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._cache:
            if len(self._cache) >= _OPEN_SHARDS:  # each memmap holds a file descriptor
                self._cache.pop(next(iter(self._cache)))
            s = self._shards[k]
            self._cache[k] = tuple(np.load(self.dir / f"shard-{s:05d}-{x}.npy", mmap_mode="r") for x in "ht")
        return self._cache[k]

    def _ids(self, k: int) -> np.ndarray:
        return np.load(self.dir / f"shard-{self._shards[k]:05d}-ids.npy")

    def pair_ids(self) -> np.ndarray:
        """All pair ids (int64) in store order."""
        if not self._shards:
            return np.zeros(0, np.int64)
        return np.concatenate([self._ids(k) for k in range(len(self._shards))])

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(h, t) fp16 of store rows `idx`, in the order given."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for feature run {self.run_id} with {len(self)} rows")
        h = np.empty((idx.size, self.d_v), np.float16)
        t = np.empty((idx.size, self.d_t), np.float16)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for k in np.unique(which):
            sel = np.nonzero(which == k)[0]
            local = idx[sel] - self._offsets[k]
            order = np.argsort(local, kind="stable")
            hk, tk = self._arrays(int(k))
            h[sel[order]] = hk[local[order]]
            t[sel[order]] = tk[local[order]]
        return h, t

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, h, t) per shard, h and t memory-mapped."""
        for k in range(len(self._shards)):
            yield (self._ids(k), *self._arrays(k))


def find_run(ws: Workspace, pool_name: str, model_id: int | None = None) -> int | None:
    """The latest finished feature run of a pool with model `model_id`, or None. Without a model: with
    the model the pool was first featurized with (never simply the newest run of any model: that may be
    a CPT checkpoint's, featurized later for TracIn); see `pipeline.feature_runs_for` for the choice
    the commands make and report."""
    runs = catalog.feature_runs_of_pool(ws, pool_name)
    if model_id is None:
        if not runs:
            return None
        model_id = int(runs[0][1])
    return next((int(r[0]) for r in reversed(runs) if r[1] == model_id), None)
