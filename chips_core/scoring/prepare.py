"""prepare: stream a pool's cached features once into a ScoringCache on disk (METHOD.md §2–6).

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
Rows are in the hashed batch order of `batches.py`, so chunk c holds whole batches and the first rows
are a uniform random subsample of the pool. rank reads a k-prefix as whole column blocks (memory-mapped).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from chips_core.errors import ChipsError
from chips_core.scoring.batches import hashed_order, n_batches
from chips_core.scoring.curvature import CurvatureAccumulator
from chips_core.scoring.endpoint import (
    EndpointGrads,
    EndpointParams,
    batch_grad_sum,
    batch_state,
    embed,
    mask_grads,
    parse_blocks,
    zeroshot_grad_sum,
)
from chips_core.scoring.params import PrepareConfig
from chips_core.scoring.sketch import Sketch, make_sketch
from chips_core.scoring.weights import eval_means, pair_stats
from chips_core.workspace.store import atomic_write_bytes

if TYPE_CHECKING:
    from chips_core.scoring.ranking import ScoringCache

COL_BLOCK = 256
AUX_COLUMNS = ("p_corr", "one_minus_p", "margin", "clipscore", "cos_x", "cos_y")
CACHE_VERSION = 1


class FeatureSource(Protocol):
    """Cached raw features of a pool (docs/ARCHITECTURE.md): ids in store order and random row access."""

    def pair_ids(self) -> np.ndarray: ...
    def __len__(self) -> int: ...
    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...


class ArrayFeatures:
    """An in-memory FeatureSource over arrays (tests, benchmarks, small eval sets)."""

    def __init__(self, pair_ids: np.ndarray, h: np.ndarray, t: np.ndarray, shard_size: int = 4096) -> None:
        if not (len(pair_ids) == len(h) == len(t)):
            raise ValueError(f"pair_ids ({len(pair_ids)}), h ({len(h)}) and t ({len(t)}) differ in length")
        self._ids = np.asarray(pair_ids, dtype=np.int64)
        self._h, self._t, self._shard = h, t, int(shard_size)

    def pair_ids(self) -> np.ndarray:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        return self._h[idx], self._t[idx]

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for s in range(0, len(self), self._shard):
            yield self._ids[s : s + self._shard], self._h[s : s + self._shard], self._t[s : s + self._shard]


@dataclass(frozen=True)
class ZeroShotEval:
    """A label-only eval set ([resolved] METHOD.md §3): image features, class per image, prompt features."""

    h: np.ndarray
    labels: np.ndarray
    class_t: np.ndarray


@dataclass(frozen=True)
class PrepareProgress:
    stage: str  # "eval" | "pool" | "done"
    done: int
    total: int
    pairs_per_s: float
    eta_s: float | None


class PrepareError(ChipsError, ValueError):
    """A prepare problem with a message naming the folder or parameter."""


def _fingerprint(ids: np.ndarray) -> str:
    return hashlib.blake2b(np.sort(ids).tobytes(), digest_size=16).hexdigest()


def _params_digest(params: EndpointParams) -> str:
    h = hashlib.blake2b(digest_size=16)
    for x in (params.W_v, params.W_t, params.logit_scale):
        h.update(x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    h.update(bytes([params.v_bias, params.t_bias]))
    return h.hexdigest()


def save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def quantize_blocks(G: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) → fp16 (n_blocks, n, COL_BLOCK) scaled per row and block to max |·| = 1, and float32 scales."""
    n, k = G.shape
    nb = -(-k // COL_BLOCK)
    Gp = torch.zeros(n, nb * COL_BLOCK, dtype=torch.float64)
    Gp[:, :k] = G.detach().to("cpu", torch.float64)
    Gb = Gp.reshape(n, nb, COL_BLOCK).permute(1, 0, 2)
    scale = Gb.abs().amax(2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (Gb / scale[:, :, None]).to(torch.float16).contiguous().numpy()
    return q, scale.to(torch.float32).numpy()


def _dev_params(params: EndpointParams, cfg: PrepareConfig) -> EndpointParams:
    return params.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))


def _tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), device=like.device).to(like.dtype)


def _eval_pass(
    eval_src: FeatureSource | ZeroShotEval, params: EndpointParams, cfg: PrepareConfig, sk: Sketch
) -> dict:
    """u (mean eval gradient, full space, float64), the unit eval mean directions μ_x, μ_y and, for a
    pair eval set, each eval pair's sketched gradient (rows of G_eval, ids in eval_ids) from the same
    batches, so that ũ = mean(G_eval) and every eval pair's share of an alignment can be shown."""
    dp = _dev_params(params, cfg)
    like = dp.W_v
    acc = None
    sx = sy = None
    G_eval, eval_ids = [], []
    if isinstance(eval_src, ZeroShotEval):
        n = len(eval_src.h)
        if n < 1 or len(eval_src.labels) != n:
            raise PrepareError(
                f"zero-shot eval needs ≥ 1 image and one label per image, got {n} and {len(eval_src.labels)}"
            )
        ct = _tensor(eval_src.class_t, like)
        for s in range(0, n, cfg.batch_size):
            h = _tensor(eval_src.h[s : s + cfg.batch_size], like)
            lab = torch.as_tensor(np.asarray(eval_src.labels[s : s + cfg.batch_size]), device=like.device)
            g = zeroshot_grad_sum(h, lab, ct, dp)
            acc = (
                g if acc is None else EndpointGrads(acc.G_v + g.G_v, acc.G_t + g.G_t, acc.g_theta + g.g_theta)
            )
            _, _, X, Y, _, _ = embed(h, ct, dp)
            sx = X.sum(0) if sx is None else sx + X.sum(0)
            sy = Y[lab].sum(0) if sy is None else sy + Y[lab].sum(0)
    else:
        ids = eval_src.pair_ids()
        n = len(ids)
        if n < 2:
            raise PrepareError(f"the eval set needs at least 2 pairs, got {n}")
        order = hashed_order(ids, cfg.seed)
        for rows in np.array_split(order, n_batches(n, cfg.batch_size)):
            rows = np.sort(rows)
            h, t = eval_src.rows(rows)
            h, t = _tensor(h, like), _tensor(t, like)
            g = batch_grad_sum(h, t, dp)
            G_eval.append(sk.batch_grads(batch_state(h, t, dp), "all").double().cpu().numpy())
            eval_ids.append(ids[rows])
            acc = (
                g if acc is None else EndpointGrads(acc.G_v + g.G_v, acc.G_t + g.G_t, acc.g_theta + g.g_theta)
            )
            _, _, X, Y, _, _ = embed(h, t, dp)
            sx = X.sum(0) if sx is None else sx + X.sum(0)
            sy = Y.sum(0) if sy is None else sy + Y.sum(0)
    u = EndpointGrads(acc.G_v / n, acc.G_t / n, acc.g_theta / n)
    mx, my = eval_means(sx[None] / n, sy[None] / n)
    out = {"u": u, "mu_x": mx, "mu_y": my, "n_eval": n}
    if G_eval:
        out.update(G_eval=np.concatenate(G_eval), eval_ids=np.concatenate(eval_ids).astype(np.int64))
    return out


def prepare(
    pool: FeatureSource,
    eval_set: FeatureSource | ZeroShotEval,
    params: EndpointParams,
    config: PrepareConfig,
    out_dir: str | Path,
    progress: Callable[[PrepareProgress], None] | None = None,
) -> ScoringCache:
    """Build (or resume) the scoring cache of `pool` against `eval_set` in `out_dir`.

    Reads features batch by batch (never the whole pool), runs no encoder, and can be killed at any
    time: finished chunks are kept and skipped on the next call with the same arguments.
    """
    from chips_core.scoring.ranking import ScoringCache

    config.validate()
    out = Path(out_dir)
    ids = np.asarray(pool.pair_ids(), dtype=np.int64)
    N = len(ids)
    if N < 2:
        raise PrepareError(f"the pool needs at least 2 pairs, got {N}")
    if params.logit_scale.numel() != 1:
        raise PrepareError("logit_scale must be a scalar")
    record = {
        "version": CACHE_VERSION,
        "config": asdict(config),
        "pool_fingerprint": _fingerprint(ids),
        "n_pairs": int(N),
        "params_digest": _params_digest(params),
        "D": params.D,
        "d_v": int(params.W_v.shape[1]),
        "d_t": int(params.W_t.shape[1]),
        "v_bias": params.v_bias,
        "t_bias": params.t_bias,
        "zero_shot": isinstance(eval_set, ZeroShotEval),
    }
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = sorted(k for k in record if old.get(k) != record[k])
        if diff:
            raise PrepareError(f"{out} holds a cache made with different {', '.join(diff)}; use a new folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg_path, record)
    if (out / "meta.json").exists():
        return ScoringCache.load(out)

    dp = _dev_params(params, config)
    sk = make_sketch(config.sketch, dp, config.k_max, config.seed, parse_blocks(config.blocks))
    t0 = time.monotonic()
    if not (out / "eval.npz").exists():
        if progress:
            progress(PrepareProgress("eval", 0, N, 0.0, None))
        ev = _eval_pass(eval_set, params, config, sk)
        u_sk = sk.apply(ev["u"])[0].double().cpu().numpy()
        per_pair = {}
        if "G_eval" in ev:
            per_pair = {"G_eval": ev["G_eval"].astype(np.float32), "eval_ids": ev["eval_ids"]}
        save_npz(
            out / "eval.npz",
            u_sketch=u_sk,
            u_full=mask_grads(ev["u"], sk.blocks).flat()[0].double().cpu().numpy(),
            mu_x=ev["mu_x"].double().cpu().numpy(),
            mu_y=ev["mu_y"].double().cpu().numpy(),
            n_eval=np.array(ev["n_eval"]),
            **per_pair,
        )
    ev = np.load(out / "eval.npz")
    mu_x, mu_y = _tensor(ev["mu_x"], dp.W_v), _tensor(ev["mu_y"], dp.W_v)

    order = hashed_order(ids, config.seed)
    batches = np.array_split(order, n_batches(N, config.batch_size))
    n_curv = -(-min(config.curvature_pairs, N) // len(batches[0]))
    chunks = [
        list(range(s, min(s + config.chunk_batches, len(batches))))
        for s in range(0, len(batches), config.chunk_batches)
    ]
    done = sum(len(batches[b]) for c, bs in enumerate(chunks) if _chunk_done(out, c) for b in bs)
    fresh = 0
    for c, bs in enumerate(chunks):
        if _chunk_done(out, c):
            continue
        rows_c = sum(len(batches[b]) for b in bs)
        _write_chunk(out, c, pool, bs, batches, sk, dp, config, mu_x, mu_y, ids, n_curv)
        done += rows_c
        fresh += rows_c
        if progress:
            rate = fresh / max(time.monotonic() - t0, 1e-9)
            progress(PrepareProgress("pool", done, N, rate, (N - done) / rate if rate > 0 else None))
    meta = {
        "n_chunks": len(chunks),
        "n_batches": len(batches),
        "n_curvature_batches": int(min(n_curv, len(batches))),
        "col_block": COL_BLOCK,
        "aux_columns": list(AUX_COLUMNS),
        "sketch_kind": sk.kind,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_json(out / "meta.json", meta)
    if progress:
        progress(PrepareProgress("done", N, N, fresh / max(time.monotonic() - t0, 1e-9), 0.0))
    return ScoringCache.load(out)


def _chunk_dir(out: Path, c: int) -> Path:
    return out / f"chunk-{c:05d}"


def _chunk_done(out: Path, c: int) -> bool:
    return (_chunk_dir(out, c) / "done.json").exists()


def _write_chunk(
    out: Path,
    c: int,
    pool: FeatureSource,
    bs: list[int],
    batches: list[np.ndarray],
    sk: Sketch,
    dp: EndpointParams,
    cfg: PrepareConfig,
    mu_x: torch.Tensor,
    mu_y: torch.Tensor,
    ids: np.ndarray,
    n_curv: int,
) -> None:
    """Score the batches `bs` of chunk c and write its files, the completion record last."""
    acc = CurvatureAccumulator(cfg.k_max, cfg.negatives_per_row, cfg.seed)
    G_parts, aux_parts, id_parts = [], [], []
    for b in bs:
        rows = batches[b]
        h, t = pool.rows(rows)
        st = batch_state(_tensor(h, dp.W_v), _tensor(t, dp.W_v), dp)
        G_parts.append(sk.batch_grads(st, cfg.negatives).cpu())
        ps = pair_stats(st)
        aux = torch.stack(
            [ps["p_corr"], ps["one_minus_p"], ps["margin"], ps["clipscore"], st.X @ mu_x, st.Y @ mu_y], dim=1
        )
        aux_parts.append(aux.double().cpu().numpy())
        id_parts.append(ids[rows])
        if b < n_curv:
            acc.add(sk, st, b)
    d = _chunk_dir(out, c)
    q, scale = quantize_blocks(torch.cat(G_parts))
    save_npy(d / "G.npy", q)
    save_npy(d / "scale.npy", scale)
    save_npy(d / "aux.npy", np.concatenate(aux_parts))
    save_npy(d / "ids.npy", np.concatenate(id_parts))
    if acc.n:
        save_npz(d / "curv.npz", pos=acc.pos, neg=acc.neg, n=np.array(acc.n))
    save_json(
        d / "done.json", {"chunk": c, "batches": [bs[0], bs[-1]], "rows": int(sum(len(x) for x in id_parts))}
    )


def pool_batches(
    pool: FeatureSource, config: PrepareConfig, expect_fingerprint: str | None = None
) -> list[np.ndarray]:
    """The store rows of each batch, exactly as prepare forms them (hashed (seed, pair_id) order)."""
    ids = np.asarray(pool.pair_ids(), dtype=np.int64)
    if expect_fingerprint is not None and _fingerprint(ids) != expect_fingerprint:
        raise PrepareError("these pool features hold other pairs than the scoring cache was prepared from")
    return np.array_split(hashed_order(ids, config.seed), n_batches(len(ids), config.batch_size))


def exact_batches(cache, pool: FeatureSource, params: EndpointParams, which: range | None = None):
    """(batch number, BatchState) of the cache's pool batches, recomputed from features in params' dtype."""
    batches = pool_batches(pool, cache.config, cache.record["pool_fingerprint"])
    for b in which if which is not None else range(len(batches)):
        h, t = pool.rows(batches[b])
        yield b, batch_state(_tensor(h, params.W_v), _tensor(t, params.W_v), params)
