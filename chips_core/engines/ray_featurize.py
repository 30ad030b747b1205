"""The Ray engine (`--engine ray`): featurize and prepare spread over a Ray cluster, same results on disk.

Imported only when the Ray engine is asked for (`import ray` never happens at chips_core import time).

featurize_ray: Ray Data reads the pool (the run's frozen manifest `pairs.parquet` for manifests, folders
and DICOM; `ray.data.read_webdataset` on the tar shards for WebDataset pools), CPU tasks load, decode,
preprocess and tokenize, an actor pool runs the encoders (GPU actors when `num_gpus_per_worker > 0`), and
the driver regroups the rows by shard and writes each shard with `features.write_shard` - the same files,
`feature_shards`/`feature_runs` rows and `rejects` as the local path. Completed shards are skipped, so a
killed job resumes where it stopped.

prepare_ray lives in `distributed_prepare.py`; both share `ray_session` and `actor_count`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chips_core.features import featurize as features
from chips_core.features.featurize import SHARD_SIZE, FeaturizeError, Progress, ProgressFn, RunInfo
from chips_core.features.models import LoadedModel, ModelIdentity, load_model, resolve_device
from chips_core.pools import dicom
from chips_core.pools import records as pools
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace

# --- the cluster connection -------------------------------------------------------------------------

# Ray's single-machine mode (a documented variable, read once, when `ray` is imported): "0" keeps a node's
# address at 127.0.0.1, so the GCS, raylet, workers and agents of a head started with it bind to the
# loopback interface, and a driver connects to "127.0.0.1:PORT" as given (with Ray's default on Linux it
# rewrites a loopback address to the machine's own address, where a loopback-only head cannot be reached).
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK = ("127.0.0.1", "::1")


def _import_ray() -> Any:
    """`import ray`; when this module is the first to import it (and the variable is not set), in Ray's
    single-machine mode, so that this process can drive a private local Ray (`local_ray`). The variable is
    removed again right after the import: the process's environment is left as it was. Its only effect on
    a connection to another cluster: a "localhost"/127.0.0.1 address is dialled on the loopback interface
    instead of the machine's own address."""
    if "ray" in sys.modules or _SINGLE_NODE_ENV in os.environ:
        return importlib.import_module("ray")
    os.environ[_SINGLE_NODE_ENV] = "0"
    try:
        return importlib.import_module("ray")
    finally:
        os.environ.pop(_SINGLE_NODE_ENV, None)


ray = _import_ray()

_TOKEN: list[str] = []  # this process's token for its private Rays (Ray keeps the first token it loads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    """The `ray` command of the Python environment running this process."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if found is None:
        raise FeaturizeError("the `ray` command was not found (pip install -r requirements-ray.txt)")
    return found


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (`ray start --block` and every Ray process it started), then
    SIGKILL to whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


def _connect_head(head: subprocess.Popen, folder: Path, port: int, log: Path, timeout_s: float) -> None:
    """Wait for the head to record its address in its temp folder, then connect this process to it."""
    record = folder / "ray_current_cluster"  # written by `ray start` once the head is up
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            raise FeaturizeError(f"ray start exited with {head.returncode}: {log.read_text()[-2000:]}")
        if record.exists() and record.read_text().strip().endswith(f":{port}"):
            try:
                # "auto" with this head's temp folder: the cluster this process started (never another one),
                # found the way Ray enables token authentication for (the token is in RAY_AUTH_TOKEN)
                ray.init(address="auto", _temp_dir=str(folder), log_to_driver=False, logging_level="WARNING")
                return
            except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as exc:
                if time.monotonic() > deadline:
                    raise FeaturizeError(f"cannot connect to the local Ray: {exc}") from exc
        if time.monotonic() > deadline:
            raise FeaturizeError(f"Ray did not start within {timeout_s:g} s: {log.read_text()[-2000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def local_ray(
    num_cpus: int | None = None, *, object_store_memory: int | None = None, timeout_s: float = 180.0
) -> Iterator[str]:
    """A private one-node Ray on 127.0.0.1, connected in this process; yields its address ('127.0.0.1:PORT').

    The head is `ray start --head --block` as a child process in its own process group and temp folder;
    only its environment carries RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (every server it starts listens on
    127.0.0.1). Token authentication (unless RAY_AUTH_MODE says otherwise) with a random token of this
    process in RAY_AUTH_TOKEN (unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set): nothing is read from or
    written to ~/.ray. While the session lasts, the token is in this process's environment (subprocesses
    can join the cluster at the address); afterwards the head is stopped, its temp folder removed and the
    environment restored.
    """
    if ray.is_initialized():
        raise FeaturizeError("this process is already connected to a Ray cluster")
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in _LOOPBACK:
        raise FeaturizeError(
            f"ray was imported before chips_core.engines.ray_featurize, without {_SINGLE_NODE_ENV}=0: Ray "
            "would dial "
            f"the private local Ray at {node_ip} instead of 127.0.0.1. Set {_SINGLE_NODE_ENV}=0 before "
            "importing ray, import chips_core.engines.ray_featurize first, or join a cluster with an address"
        )
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    folder = Path(tempfile.mkdtemp(prefix="chips-ray-"))
    head = None
    try:
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            if not _TOKEN:
                _TOKEN.append(secrets.token_hex(32))
            os.environ["RAY_AUTH_TOKEN"] = _TOKEN[0]
        os.environ.pop("RAY_ADDRESS", None)  # else ray.init("auto") would join the cluster it names
        env = {**os.environ, _SINGLE_NODE_ENV: "0"}
        env.setdefault("RAY_AUTH_MODE", "token")
        port = _free_port()
        argv = [_ray_cli(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                f"--temp-dir={folder}", "--include-dashboard=false",
                f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]  # fmt: skip
        if num_cpus is not None:
            argv.append(f"--num-cpus={num_cpus}")
        if object_store_memory is not None:
            argv.append(f"--object-store-memory={object_store_memory}")
        log = folder / "head.log"
        with open(log, "wb") as out:
            head = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)  # fmt: skip
        try:
            _connect_head(head, folder, port, log, timeout_s)
            yield f"127.0.0.1:{port}"
        finally:
            ray.shutdown()
    finally:
        if head is not None:
            _stop_head(head)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to the Ray cluster at `address` (or start a private local one); disconnect only what we
    started.

    A private local Ray (address None, `local_ray`) listens on 127.0.0.1 only and uses its own
    authentication token. A process that is already connected (ray.init called by the caller) keeps its
    connection.
    """
    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as stack:
        if address is None:
            stack.enter_context(local_ray(num_cpus))
        else:
            try:
                ray.init(address=address, log_to_driver=False, logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
                raise FeaturizeError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
            stack.callback(ray.shutdown)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        yield


def actor_count(requested: int | None, gpus_per_actor: float, what: str) -> int:
    """How many actors to start: `requested`, or one per `gpus_per_actor` GPUs of the cluster (1 for CPU
    actors); refuses GPU actors the cluster cannot place (Ray would wait for them forever)."""
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus_per_actor > 0:
        fit = int(gpus // gpus_per_actor + 1e-9)
        if fit < (requested or 1):
            raise FeaturizeError(
                f"{requested or 1} {what} actor(s) with {gpus_per_actor} GPU(s) each need "
                f"{(requested or 1) * gpus_per_actor:g} GPUs; the Ray cluster has {gpus:g}"
            )
        return requested or fit
    return requested or 1


# --- featurize ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What an encoder actor needs to load the same model as the driver (checked by identity)."""

    name: str
    pretrained: str | None
    seed: int
    identity: ModelIdentity

    @classmethod
    def of(cls, loaded: LoadedModel, name: str, pretrained: str | None, seed: int) -> ModelSpec:
        return cls(name, pretrained, seed, loaded.identity)


class _Encoder:
    """An actor holding the model; encodes batches of preprocessed rows (features.encode_batch)."""

    def __init__(self, spec: ModelSpec, device: str) -> None:
        dev = resolve_device(device)
        self.loaded = load_model(spec.name, spec.pretrained, device=dev, seed=spec.seed)
        if self.loaded.identity != spec.identity:
            raise FeaturizeError(
                f"an encoder worker loaded {self.loaded.identity.label()}, the driver "
                f"{spec.identity.label()}: the nodes do not see the same model files"
            )
        self.dev = dev

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        n = len(ok)
        h = np.zeros((n, self.loaded.d_v), np.float16)
        t = np.zeros((n, self.loaded.d_t), np.float16)
        keep = np.nonzero(ok)[0]
        if len(keep):
            images = [(j, torch.from_numpy(np.asarray(batch["image"][k]))) for j, k in enumerate(keep)]
            tokens = torch.from_numpy(np.stack([np.asarray(batch["tokens"][k]) for k in keep]))
            part = {"ids": batch["pair_id"][keep], "images": images, "jpegs": [], "tokens": tokens,
                    "rejects": []}  # fmt: skip
            enc = features.encode_batch(part, self.loaded, self.dev, raw_jpeg=False)
            h[keep], t[keep] = enc["h"], enc["t"]
        out = {k: batch[k] for k in ("pos", "pair_id", "ok", "ref", "reason", "detail")}
        out.update(h=h, t=t)
        return out


def _prepared_rows(
    rows: list[tuple[int, int, str, str, Any]], preprocess: Any, tokenizer: Any, context: int, size: tuple
) -> dict[str, np.ndarray]:
    """(pos, pair_id, ref, caption, loader) rows -> model inputs, or a reject reason per row."""
    n = len(rows)
    image = np.zeros((n, 3, *size), np.float32)
    tokens = np.zeros((n, context), np.int64)
    ok = np.zeros(n, bool)
    reason, detail = [""] * n, [""] * n
    for i, (*_, loader) in enumerate(rows):
        try:
            image[i] = preprocess(loader()).numpy()
            ok[i] = True
        except Exception as exc:  # noqa: BLE001 - any failure of one image rejects that image only
            reason[i] = getattr(exc, "reason", "load_error")
            detail[i] = f"{type(exc).__name__}: {exc}"
    good = np.nonzero(ok)[0]
    if len(good):
        tokens[good] = np.asarray(tokenizer([rows[i][3] for i in good]))
    return {
        "pos": np.array([r[0] for r in rows], np.int64),
        "pair_id": np.array([r[1] for r in rows], np.int64),
        "ref": np.array([r[2] for r in rows], dtype=object),
        "ok": ok,
        "image": image,
        "tokens": tokens,
        "reason": np.array(reason, dtype=object),
        "detail": np.array(detail, dtype=object),
    }


def _image_from_bytes(data: bytes, ref: str) -> Any:
    """pools.load_image's decoding applied to bytes already read (WebDataset members streamed by Ray)."""
    if not data:
        raise pools.ImageLoadError("zero_bytes", f"{ref}: file is empty (0 bytes)")
    if pools.is_dicom_ref(ref, data):
        try:
            return dicom.to_pil_rgb(dicom.decode(data).pixels)
        except dicom.DicomError as exc:
            raise pools.ImageLoadError(exc.reason, f"{ref}: {exc}") from None
    return pools.to_rgb(pools.decode_pil(data, ref))


def _manifest_batch(batch: dict[str, np.ndarray], **kw: Any) -> dict[str, np.ndarray]:
    """Rows of the frozen manifest -> model inputs (images loaded by reference, as the local path does)."""
    keep = np.isin(batch["pos"] // kw.pop("shard_size"), kw.pop("todo"))
    rows = [
        (int(p), int(i), str(f), str(c), (lambda f=str(f): pools.load_image(f)))
        for p, i, f, c in zip(batch["pos"][keep], batch["pair_id"][keep], batch["filepath"][keep],
                              batch["caption"][keep], strict=True)
    ]  # fmt: skip
    return _prepared_rows(rows, **kw)


_LOOKUPS: dict[Any, dict] = {}
_DECODE_BATCH = 64


def _wds_batch(batch: Any, lookup: Any, **kw: Any) -> dict[str, np.ndarray]:
    """WebDataset samples (raw member bytes) -> model inputs for the members the pending shards hold."""
    if isinstance(lookup, ray.ObjectRef):  # fetched once per worker process
        key = lookup.hex()
        if key not in _LOOKUPS:
            _LOOKUPS.clear()
            _LOOKUPS[key] = ray.get(lookup)
        lookup = _LOOKUPS[key]
    table = lookup
    exts = [c for c in batch.columns if not c.startswith("__") and c != "path"]  # path: include_paths
    rows = []
    for rec in batch.to_dict("records"):
        for ext in exts:
            data = rec.get(ext)
            ref = f"{rec['path']}{pools.TAR_SEP}{rec['__key__']}.{ext}"
            if isinstance(data, bytes | bytearray) and ref in table:
                pos, pid, caption = table[ref]
                rows.append((pos, pid, ref, caption, (lambda d=bytes(data), r=ref: _image_from_bytes(d, r))))
    return _prepared_rows(rows, **kw)


def pool_dataset(info: RunInfo, todo: list[int], loaded: LoadedModel, fmt: str) -> ray.data.Dataset:
    """The rows of shards `todo` as a Ray dataset of model inputs (CPU tasks: load, decode, preprocess,
    tokenize): read_webdataset on the tar shards for a 'wds' pool, else the run's frozen manifest."""
    context = int(np.asarray(loaded.tokenizer(["x"])).shape[1])
    kw = {"preprocess": loaded.preprocess, "tokenizer": loaded.tokenizer, "context": context,
          "size": loaded.image_size}  # fmt: skip
    # A decode task's memory (its float32 output, twice for the PIL images): telling Ray also keeps Ray Data
    # from fusing decoding into the encoder actors, so it runs on every CPU and the actors only encode.
    opts = {
        "batch_size": _DECODE_BATCH,
        "memory": _DECODE_BATCH * 3 * int(np.prod(loaded.image_size)) * 4 * 2,
    }
    if fmt != "wds":
        ds = ray.data.read_parquet(str(info.manifest))
        return ds.map_batches(
            _manifest_batch, batch_format="numpy", **opts,
            fn_kwargs={**kw, "shard_size": info.shard_size, "todo": np.asarray(todo)},
        )  # fmt: skip
    table, shards = {}, set()
    for s in todo:
        ids, refs, caps = features.read_rows(info.manifest, *info.shard_range(s))
        for pos, (pid, ref, cap) in enumerate(zip(ids, refs, caps, strict=True), info.shard_range(s)[0]):
            table[ref] = (pos, int(pid), cap)
            shards.add(pools.split_ref(ref)[0])
    ds = ray.data.read_webdataset(
        sorted(shards), decoder=None, include_paths=True, override_num_blocks=max(1, len(shards))
    )
    return ds.map_batches(_wds_batch, batch_format="pandas", **opts,
                          fn_kwargs={**kw, "lookup": ray.put(table)})  # fmt: skip


class _ShardCollector:
    """Regroups encoded rows by shard on the driver; writes a shard once all its rows are accounted for."""

    def __init__(self, ws: Workspace, info: RunInfo, todo: list[int], done: set[int], progress: ProgressFn):
        self.ws, self.info, self.progress = ws, info, progress
        self.expected = {s: info.shard_range(s)[1] - info.shard_range(s)[0] for s in todo}
        self.rows: dict[int, dict[int, tuple]] = {s: {} for s in todo}
        self.t0, self.here = time.monotonic(), 0
        self.done = sum(info.shard_range(s)[1] - info.shard_range(s)[0] for s in done)
        self.n_done = len(done)
        self._report()

    def add(self, b: dict[str, np.ndarray]) -> None:
        for j, pos in enumerate(b["pos"]):
            s = int(pos) // self.info.shard_size
            if s not in self.rows:  # written already (a retried task can repeat rows)
                continue
            self.rows[s][int(pos)] = (int(b["pair_id"][j]), bool(b["ok"][j]), b["h"][j], b["t"][j],
                                      str(b["ref"][j]), str(b["reason"][j]), str(b["detail"][j]))  # fmt: skip
            if len(self.rows[s]) == self.expected[s]:
                self._flush(s)

    def finish(self) -> None:
        """Rows no reader produced (a WebDataset member gone since ingest) are rejected, then flushed."""
        for s in list(self.rows):
            start, end = self.info.shard_range(s)
            ids, refs, _ = features.read_rows(self.info.manifest, start, end)
            for pos in range(start, end):
                if pos not in self.rows[s]:
                    ref = refs[pos - start]
                    why = f"{ref}: not found in the WebDataset shards at featurize time"
                    self.rows[s][pos] = (int(ids[pos - start]), False, None, None, ref, "missing_file", why)
            self._flush(s)

    def _flush(self, s: int) -> None:
        rows = self.rows.pop(s)
        got = [rows[p] for p in sorted(rows)]
        good = [r for r in got if r[1]]
        ids = np.array([r[0] for r in good], np.int64)
        h = np.stack([r[2] for r in good]) if good else np.zeros((0, self.info.d_v), np.float16)
        t = np.stack([r[3] for r in good]) if good else np.zeros((0, self.info.d_t), np.float16)
        features.write_shard(self.ws, self.info, s, ids, h, t, [(r[4], r[5], r[6]) for r in got if not r[1]])
        n = self.expected[s]
        self.done, self.here, self.n_done = self.done + n, self.here + n, self.n_done + 1
        self._report()

    def _report(self) -> None:
        if self.progress is None:
            return
        rate = self.here / max(time.monotonic() - self.t0, 1e-9)
        left = self.info.n_total - self.done
        eta = left / rate if rate > 0 else (0.0 if left == 0 else None)
        self.progress(Progress(self.done, self.info.n_total, rate, eta, self.n_done, self.info.n_shards))


def featurize_ray(
    ws: Workspace,
    pool_name: str,
    model: str = "chips-tiny-vit",
    pretrained: str | None = None,
    *,
    seed: int = 0,
    address: str | None = None,
    num_gpus_per_worker: float = 0.0,
    num_encoders: int | None = None,
    batch_size: int = 256,
    shard_size: int = SHARD_SIZE,
    num_cpus: int | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Featurize pool `pool_name` on a Ray cluster; returns the feature run id (shared with the local path).

    `address`: a running cluster ('127.0.0.1:6379', 'ray://head:10001'); None starts a local Ray with
    `num_cpus`. `num_encoders` encoder actors (default: one per `num_gpus_per_worker` GPUs of the cluster,
    or one CPU actor when 0). Every node must be able to load the model and read the pool's image paths
    (or WebDataset shards); see docs/SCALING.md.
    """
    if batch_size < 1 or (num_encoders is not None and num_encoders < 1) or num_gpus_per_worker < 0:
        raise FeaturizeError(
            f"batch_size ({batch_size}) and num_encoders ({num_encoders}) must be >= 1 and "
            f"num_gpus_per_worker ({num_gpus_per_worker}) >= 0"
        )
    loaded = load_model(model, pretrained, device="cpu", seed=seed)
    info = features.open_run(ws, pool_name, loaded, shard_size)
    with features.run_lock(info):  # `chips status` tells a live writer from a dead one by this lock
        _featurize_ray_run(ws, info, loaded, model, pretrained, seed, address, num_gpus_per_worker,
                           num_encoders, batch_size, num_cpus, progress)  # fmt: skip
    return info.run_id


def _featurize_ray_run(
    ws: Workspace, info: RunInfo, loaded: Any, model: str, pretrained: str | None, seed: int,
    address: str | None, num_gpus_per_worker: float, num_encoders: int | None, batch_size: int,
    num_cpus: int | None, progress: ProgressFn | None,
) -> None:  # fmt: skip
    fmt = catalog.pool_row(ws, info.pool_id)[2]
    done = features.done_shards(ws, info.run_id)
    todo = [s for s in range(info.n_shards) if s not in done]
    collector = _ShardCollector(ws, info, todo, done, progress)
    if todo:
        with ray_session(address, num_cpus):
            num_encoders = actor_count(num_encoders, num_gpus_per_worker, "encoder")
            device = "cuda" if num_gpus_per_worker > 0 else "cpu"
            ds = pool_dataset(info, todo, loaded, fmt).map_batches(
                _Encoder, fn_constructor_args=(ModelSpec.of(loaded, model, pretrained, seed), device),
                compute=ray.data.ActorPoolStrategy(size=num_encoders), batch_size=batch_size,
                batch_format="numpy",
                num_gpus=num_gpus_per_worker or None, num_cpus=None if num_gpus_per_worker else 1,
            )  # fmt: skip
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                collector.add(batch)
        collector.finish()
    features.finish_run(ws, info)
