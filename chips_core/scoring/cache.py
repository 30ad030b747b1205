"""The scoring cache format: its folder layout, writing its files, and `ScoringCache`, which reads a
finished one memory-mapped. Torch-free: numpy only (`prepare` computes what goes in, `ranking` what comes
out).

Layout of a cache folder (every file written atomically; a chunk exists iff its `done.json` does):
  config.json                 the PrepareConfig and the pool fingerprint (a resume must match it)
  eval.npz                    ũ (k_max, unscaled), u (p, full space), μ_x, μ_y, eval size, and for a
                              pair eval set G_eval (n_eval, k_max) float32, the eval pairs' unscaled
                              sketched gradients (same batches and sketch; ũ is their mean), eval_ids
  chunk-00000/G.npy           sketched gradients, fp16, column blocks (n_blocks, rows, COL_BLOCK),
             /scale.npy       float32 (n_blocks, rows): each row of each block is scaled to max |·| = 1
             /aux.npy         float64 (rows, 6): AUX_COLUMNS (weights' ingredients and CLIPScore)
             /ids.npy         pair ids of the chunk's rows
             /curv.npz        Φ̃_pos, Φ̃_neg sums and count over the chunk's curvature batches (if any)
             /done.json       completion record
  meta.json                   written last: the cache is complete
Rows are in the hashed batch order of `batches.py` (`plan_chunks`), so chunk c holds whole batches and the
first rows are a uniform random subsample of the pool. rank reads a k-prefix as whole column blocks.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from chips_core.errors import ChipsError
from chips_core.scoring.batches import hashed_order, n_batches
from chips_core.scoring.params import PrepareConfig
from chips_core.workspace.store import atomic_write_bytes

COL_BLOCK = 256
AUX_COLUMNS = ("p_corr", "one_minus_p", "margin", "clipscore", "cos_x", "cos_y")
CACHE_VERSION = 1
CONFIG_FILE, EVAL_FILE, META_FILE, DONE_FILE = "config.json", "eval.npz", "meta.json", "done.json"
#: the parameter blocks of caches written before config.json recorded `blocks`: they scored all of these
LEGACY_BLOCKS = "visual,text,temperature"


class PrepareError(ChipsError, ValueError):
    """A prepare or scoring-cache problem with a message naming the folder or parameter."""


def save_npy(path: Path, arr: np.ndarray) -> None:
    """Write one array as .npy, atomically."""
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write named arrays as .npz, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: Path, obj: dict) -> None:
    """Write a JSON record (sorted keys, indented), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fingerprint(ids: np.ndarray) -> str:
    """The pool fingerprint of config.json: a hash of the sorted pair ids."""
    return hashlib.blake2b(np.sort(ids).tobytes(), digest_size=16).hexdigest()


def chunk_dir(root: Path, c: int) -> Path:
    """The folder of chunk c."""
    return Path(root) / f"chunk-{c:05d}"


def chunk_done(root: Path, c: int) -> bool:
    """Whether chunk c is complete (its completion record exists)."""
    return (chunk_dir(root, c) / DONE_FILE).exists()


def has_eval(root: Path) -> bool:
    """Whether the eval pass of the cache is written."""
    return (Path(root) / EVAL_FILE).exists()


def is_finished(root: Path) -> bool:
    """Whether the cache is complete (meta.json, written last, exists)."""
    return (Path(root) / META_FILE).exists()


def read_eval_means(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(μ_x, μ_y): the eval set's unit mean directions, as stored by the eval pass."""
    ev = np.load(Path(root) / EVAL_FILE)
    return ev["mu_x"], ev["mu_y"]


@dataclass(frozen=True)
class ChunkPlan:
    """How a pool's store rows fall into batches and chunks (a function of the pair ids and the config)."""

    batches: list[np.ndarray]  # store rows of each batch, in hashed (seed, pair_id) order
    chunks: list[list[int]]  # batch numbers of each chunk
    n_curv: int  # batches 0 .. n_curv-1 feed the curvature (may exceed len(batches))

    def rows(self, c: int) -> np.ndarray:
        """The store rows of chunk c, in cache order."""
        return np.concatenate([self.batches[b] for b in self.chunks[c]])

    def n_rows(self, c: int) -> int:
        return sum(len(self.batches[b]) for b in self.chunks[c])

    def pending(self, root: Path) -> list[int]:
        """The chunks not yet complete in the cache folder `root`."""
        return [c for c in range(len(self.chunks)) if not chunk_done(root, c)]


def plan_chunks(ids: np.ndarray, config: Any) -> ChunkPlan:
    """The ChunkPlan of a pool with pair ids `ids` (store order) under a PrepareConfig."""
    batches = np.array_split(hashed_order(ids, config.seed), n_batches(len(ids), config.batch_size))
    n_curv = -(-min(config.curvature_pairs, len(ids)) // len(batches[0]))
    step = config.chunk_batches
    chunks = [list(range(s, min(s + step, len(batches)))) for s in range(0, len(batches), step)]
    return ChunkPlan(batches, chunks, n_curv)


@dataclass
class ChunkData:
    """The arrays of one computed chunk, ready to be written (see the layout above)."""

    chunk: int
    batches: tuple[int, int]  # first and last batch number
    G: np.ndarray  # fp16 (n_blocks, rows, COL_BLOCK)
    scale: np.ndarray  # float32 (n_blocks, rows)
    aux: np.ndarray  # float64 (rows, len(AUX_COLUMNS))
    ids: np.ndarray  # int64 (rows,)
    curv: tuple[np.ndarray, np.ndarray, int] | None  # (Φ̃_pos sum, Φ̃_neg sum, count) or None


def write_chunk(root: Path, data: ChunkData) -> None:
    """Write a chunk's files into the cache folder `root`, the completion record last."""
    d = chunk_dir(root, data.chunk)
    save_npy(d / "G.npy", data.G)
    save_npy(d / "scale.npy", data.scale)
    save_npy(d / "aux.npy", data.aux)
    save_npy(d / "ids.npy", data.ids)
    if data.curv is not None:
        pos, neg, n = data.curv
        save_npz(d / "curv.npz", pos=pos, neg=neg, n=np.array(n))
    save_json(
        d / DONE_FILE,
        {"chunk": data.chunk, "batches": [data.batches[0], data.batches[1]], "rows": int(len(data.ids))},
    )


def write_meta(root: Path, plan: ChunkPlan, sketch_kind: str) -> None:
    """Write meta.json, which marks the cache complete (call once every chunk is done)."""
    meta = {
        "n_chunks": len(plan.chunks),
        "n_batches": len(plan.batches),
        "n_curvature_batches": int(min(plan.n_curv, len(plan.batches))),
        "col_block": COL_BLOCK,
        "aux_columns": list(AUX_COLUMNS),
        "sketch_kind": sketch_kind,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_json(Path(root) / META_FILE, meta)


class ScoringCache:
    """A finished prepare, memory-mapped: sketched gradients, curvature, ũ and the weights' ingredients.

    Reading only; the math over it (projections, the k×k system) is in `ranking`, which keeps what it
    derives per cache in `memo`."""

    def __init__(self, root: Path, record: dict, meta: dict) -> None:
        self.root, self.record, self.meta = root, record, meta
        ev = np.load(root / EVAL_FILE)
        self.u = ev["u_sketch"]
        self.u_full = ev["u_full"]
        self.n_eval = int(ev["n_eval"])
        self.G: list[np.ndarray] = []
        self.scales: list[np.ndarray] = []
        aux, ids = [], []
        pos = np.zeros((self.k_max, self.k_max))
        neg = np.zeros_like(pos)
        n_curv = 0
        for c in range(meta["n_chunks"]):
            d = chunk_dir(root, c)
            self.G.append(np.load(d / "G.npy", mmap_mode="c"))
            self.scales.append(np.load(d / "scale.npy"))
            aux.append(np.load(d / "aux.npy"))
            ids.append(np.load(d / "ids.npy"))
            if (d / "curv.npz").exists():
                cv = np.load(d / "curv.npz")
                pos += cv["pos"]
                neg += cv["neg"]
                n_curv += int(cv["n"])
        self.aux = np.concatenate(aux)
        self.pair_ids = np.concatenate(ids)
        self.phi_pos, self.phi_neg = pos / n_curv, neg / n_curv
        self.n_curvature = n_curv
        #: arrays derived from this cache (row norms, eigenvalues), keyed by what they depend on
        self.memo: dict[tuple, np.ndarray] = {}

    @classmethod
    def load(cls, path: str | Path) -> ScoringCache:
        """Open a finished cache folder (one with meta.json)."""
        root = Path(path)
        if not is_finished(root):
            raise PrepareError(
                f"{root} is not a finished scoring cache (no meta.json); run or resume prepare"
            )
        return cls(
            root,
            json.loads((root / CONFIG_FILE).read_text()),
            json.loads((root / META_FILE).read_text()),
        )

    @cached_property
    def config(self) -> PrepareConfig:
        """The PrepareConfig the cache was made with (caches written before `blocks` existed scored every
        block)."""
        return PrepareConfig(**{"blocks": LEGACY_BLOCKS, **self.record["config"]})

    @cached_property
    def G_eval(self) -> np.ndarray | None:
        """(n_eval, k_max) float32 unscaled sketched eval-pair gradients, read on first use; None for
        zero-shot caches and caches prepared before they were stored."""
        ev = np.load(self.root / EVAL_FILE)
        return ev["G_eval"] if "G_eval" in ev.files else None

    @cached_property
    def eval_ids(self) -> np.ndarray | None:
        """Pair ids of the rows of G_eval (None where G_eval is)."""
        ev = np.load(self.root / EVAL_FILE)
        return ev["eval_ids"] if "eval_ids" in ev.files else None

    @property
    def k_max(self) -> int:
        return int(self.record["config"]["k_max"])

    @property
    def n(self) -> int:
        return int(self.record["n_pairs"])

    def column(self, name: str) -> np.ndarray:
        """One of AUX_COLUMNS for every pair, in cache order."""
        return self.aux[:, AUX_COLUMNS.index(name)]

    def row(self, pair_id: int) -> np.ndarray:
        """The stored (fp16, dequantized) unscaled sketched gradient of one pool pair, float64 (k_max,)."""
        hit = np.flatnonzero(self.pair_ids == int(pair_id))
        if not len(hit):
            raise KeyError(f"pair {pair_id} is not in the scoring cache {self.root}")
        i = int(hit[0])
        for G, sc in zip(self.G, self.scales, strict=True):
            if i < G.shape[1]:
                g = G[:, i, :].astype(np.float64) * sc[:, i, None]
                return g.reshape(-1)[: self.k_max]
            i -= G.shape[1]
        raise AssertionError("pair_ids and chunk rows disagree")
