"""prepare: stream a pool's cached features once into a scoring cache on disk (METHOD.md §2–6).

The cache format (layout, files, `ScoringCache`) is `cache.py`. prepare is composed of public steps that
the local engine (`prepare` here) and the Ray engine (`engines/ray_prepare.py`) both call:
  open_cache   check the arguments; write config.json, or check that a resume matches it
  Scorer       the device parameters and sketch: `eval_pass` (→ `write_eval`) and `chunk` (→ ChunkData)
  write_eval   the eval pass into eval.npz (skipped when it is there)
  plan_chunks  (cache.py) the pool's batches and chunks; `ChunkPlan.pending` lists the chunks to compute
  write_chunk  (cache.py) a chunk's files, completion record last
  finish       meta.json (the cache is complete) → ScoringCache
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from chips_core.scoring.batches import hashed_order, n_batches
from chips_core.scoring.cache import (
    CACHE_VERSION,
    COL_BLOCK,
    CONFIG_FILE,
    EVAL_FILE,
    ChunkData,
    ChunkPlan,
    PrepareError,
    ScoringCache,
    fingerprint,
    has_eval,
    is_finished,
    plan_chunks,
    read_eval_means,
    save_json,
    save_npz,
    write_chunk,
    write_meta,
)
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

__all__ = [
    "ArrayFeatures",
    "FeatureSource",
    "PrepareConfig",
    "PrepareProgress",
    "PrepareRun",
    "Scorer",
    "ZeroShotEval",
    "as_tensor",
    "device_params",
    "exact_batches",
    "finish",
    "open_cache",
    "pool_batches",
    "prepare",
    "quantize_blocks",
    "start",
    "write_eval",
]


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


def _params_digest(params: EndpointParams) -> str:
    h = hashlib.blake2b(digest_size=16)
    for x in (params.W_v, params.W_t, params.logit_scale):
        h.update(x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    h.update(bytes([params.v_bias, params.t_bias]))
    return h.hexdigest()


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


def device_params(params: EndpointParams, cfg: PrepareConfig) -> EndpointParams:
    """The endpoint parameters on the config's device, in its dtype."""
    return params.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))


def as_tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """An array as a tensor on the device and in the dtype of `like`."""
    return torch.as_tensor(np.asarray(a), device=like.device).to(like.dtype)


def _add(acc: EndpointGrads | None, g: EndpointGrads) -> EndpointGrads:
    return g if acc is None else EndpointGrads(acc.G_v + g.G_v, acc.G_t + g.G_t, acc.g_theta + g.g_theta)


class Scorer:
    """What the eval pass and every chunk of one cache compute with: the endpoint parameters on the
    config's device and dtype, and the sketch (built from the config's seed, so that every process that
    builds a Scorer from the same arguments, e.g. each Ray actor, holds the same sketch)."""

    def __init__(self, params: EndpointParams, config: PrepareConfig) -> None:
        self.config = config
        self.params = device_params(params, config)
        self.sketch: Sketch = make_sketch(
            config.sketch, self.params, config.k_max, config.seed, parse_blocks(config.blocks)
        )

    def eval_pass(self, eval_src: FeatureSource | ZeroShotEval) -> dict:
        """u (mean eval gradient, full space, float64), the unit eval mean directions μ_x, μ_y and, for a
        pair eval set, each eval pair's sketched gradient (rows of G_eval, ids in eval_ids) from the same
        batches, so that ũ = mean(G_eval) and every eval pair's share of an alignment can be shown."""
        cfg, dp, sk = self.config, self.params, self.sketch
        like = dp.W_v
        acc = None
        sx = sy = None
        G_eval, eval_ids = [], []
        if isinstance(eval_src, ZeroShotEval):
            n = len(eval_src.h)
            if n < 1 or len(eval_src.labels) != n:
                raise PrepareError(
                    f"zero-shot eval needs ≥ 1 image and one label per image, got {n} and "
                    f"{len(eval_src.labels)}"
                )
            ct = as_tensor(eval_src.class_t, like)
            for s in range(0, n, cfg.batch_size):
                h = as_tensor(eval_src.h[s : s + cfg.batch_size], like)
                lab = torch.as_tensor(np.asarray(eval_src.labels[s : s + cfg.batch_size]), device=like.device)
                acc = _add(acc, zeroshot_grad_sum(h, lab, ct, dp))
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
                h, t = as_tensor(h, like), as_tensor(t, like)
                g = batch_grad_sum(h, t, dp)
                G_eval.append(sk.batch_grads(batch_state(h, t, dp), "all").double().cpu().numpy())
                eval_ids.append(ids[rows])
                acc = _add(acc, g)
                _, _, X, Y, _, _ = embed(h, t, dp)
                sx = X.sum(0) if sx is None else sx + X.sum(0)
                sy = Y.sum(0) if sy is None else sy + Y.sum(0)
        u = EndpointGrads(acc.G_v / n, acc.G_t / n, acc.g_theta / n)
        mx, my = eval_means(sx[None] / n, sy[None] / n)
        out = {"u": u, "mu_x": mx, "mu_y": my, "n_eval": n}
        if G_eval:
            out.update(G_eval=np.concatenate(G_eval), eval_ids=np.concatenate(eval_ids).astype(np.int64))
        return out

    def chunk(
        self,
        c: int,
        src: FeatureSource,
        ids: np.ndarray,
        bs: list[int],
        rows: list[np.ndarray],
        mu_x: np.ndarray,
        mu_y: np.ndarray,
        n_curv: int,
    ) -> ChunkData:
        """Chunk c: the batches numbered `bs`, whose rows of `src` (pair ids `ids`, in src's order) are
        `rows`, scored against the eval means; batches numbered below n_curv feed the curvature."""
        cfg, dp, sk = self.config, self.params, self.sketch
        mx, my = as_tensor(mu_x, dp.W_v), as_tensor(mu_y, dp.W_v)
        acc = CurvatureAccumulator(cfg.k_max, cfg.negatives_per_row, cfg.seed)
        G_parts, aux_parts, id_parts = [], [], []
        for b, r in zip(bs, rows, strict=True):
            h, t = src.rows(r)
            st = batch_state(as_tensor(h, dp.W_v), as_tensor(t, dp.W_v), dp)
            G_parts.append(sk.batch_grads(st, cfg.negatives).cpu())
            ps = pair_stats(st)
            aux = torch.stack(
                [ps["p_corr"], ps["one_minus_p"], ps["margin"], ps["clipscore"], st.X @ mx, st.Y @ my], dim=1
            )
            aux_parts.append(aux.double().cpu().numpy())
            id_parts.append(ids[r])
            if b < n_curv:
                acc.add(sk, st, b)
        q, scale = quantize_blocks(torch.cat(G_parts))
        return ChunkData(
            chunk=c,
            batches=(bs[0], bs[-1]),
            G=q,
            scale=scale,
            aux=np.concatenate(aux_parts),
            ids=np.concatenate(id_parts),
            curv=(acc.pos, acc.neg, acc.n) if acc.n else None,
        )


def open_cache(
    out_dir: str | Path,
    pool: FeatureSource,
    eval_set: FeatureSource | ZeroShotEval,
    params: EndpointParams,
    config: PrepareConfig,
) -> Path:
    """Check the arguments and open the cache folder: write its config.json, or check that the one there
    was made with the same arguments (a resume). Returns the folder."""
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
        "pool_fingerprint": fingerprint(ids),
        "n_pairs": int(N),
        "params_digest": _params_digest(params),
        "D": params.D,
        "d_v": int(params.W_v.shape[1]),
        "d_t": int(params.W_t.shape[1]),
        "v_bias": params.v_bias,
        "t_bias": params.t_bias,
        "zero_shot": isinstance(eval_set, ZeroShotEval),
    }
    cfg_path = out / CONFIG_FILE
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = sorted(k for k in record if old.get(k) != record[k])
        if diff:
            raise PrepareError(f"{out} holds a cache made with different {', '.join(diff)}; use a new folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg_path, record)
    return out


def write_eval(out: Path, scorer: Scorer, eval_set: FeatureSource | ZeroShotEval) -> None:
    """Run the eval pass and write eval.npz, unless the cache folder has it already."""
    if has_eval(out):
        return
    sk = scorer.sketch
    ev = scorer.eval_pass(eval_set)
    u_sk = sk.apply(ev["u"])[0].double().cpu().numpy()
    per_pair = {}
    if "G_eval" in ev:
        per_pair = {"G_eval": ev["G_eval"].astype(np.float32), "eval_ids": ev["eval_ids"]}
    save_npz(
        Path(out) / EVAL_FILE,
        u_sketch=u_sk,
        u_full=mask_grads(ev["u"], sk.blocks).flat()[0].double().cpu().numpy(),
        mu_x=ev["mu_x"].double().cpu().numpy(),
        mu_y=ev["mu_y"].double().cpu().numpy(),
        n_eval=np.array(ev["n_eval"]),
        **per_pair,
    )


def finish(out: Path, plan: ChunkPlan, scorer: Scorer) -> ScoringCache:
    """Write meta.json once every chunk of `plan` is done (the cache is complete) and open the cache."""
    missing = plan.pending(out)
    if missing:
        raise PrepareError(f"{out}: chunks {missing[:5]} are not done; the cache cannot be finished")
    write_meta(out, plan, scorer.sketch.kind)
    return ScoringCache.load(out)


@dataclass
class PrepareRun:
    """One prepare call as its engine drives it: `start` opens (or resumes) the cache and writes the eval
    pass, the engine writes each chunk of `todo` (`write_chunk`) and calls `chunk_written`, then `finish`.
    The local loop (`prepare`) and the Ray engine (engines/ray_prepare.py) share every step."""

    out: Path
    ids: np.ndarray
    scorer: Scorer | None  # None (and plan None): the cache was finished before this call
    plan: ChunkPlan | None
    todo: list[int]
    mu_x: np.ndarray | None
    mu_y: np.ndarray | None
    progress: Callable[[PrepareProgress], None] | None
    t0: float
    done: int = 0
    fresh: int = 0

    def chunk_written(self, c: int) -> None:
        """Count chunk c as written and report progress (rows per second over this call's chunks)."""
        self.done += self.plan.n_rows(c)
        self.fresh += self.plan.n_rows(c)
        if self.progress:
            N, rate = len(self.ids), self.fresh / max(time.monotonic() - self.t0, 1e-9)
            eta = (N - self.done) / rate if rate > 0 else None
            self.progress(PrepareProgress("pool", self.done, N, rate, eta))

    def finish(self) -> ScoringCache:
        """Complete the cache (meta.json once every chunk is done) and open it."""
        if self.plan is None:
            return ScoringCache.load(self.out)
        cache = finish(self.out, self.plan, self.scorer)
        if self.progress:
            N = len(self.ids)
            self.progress(
                PrepareProgress("done", N, N, self.fresh / max(time.monotonic() - self.t0, 1e-9), 0.0)
            )
        return cache


def start(
    pool: FeatureSource,
    eval_set: FeatureSource | ZeroShotEval,
    params: EndpointParams,
    config: PrepareConfig,
    out_dir: str | Path,
    progress: Callable[[PrepareProgress], None] | None = None,
) -> PrepareRun:
    """Open (or resume) the cache of `pool` against `eval_set`, write the eval pass if missing, and plan the
    chunks still to compute."""
    out = open_cache(out_dir, pool, eval_set, params, config)
    ids = np.asarray(pool.pair_ids(), dtype=np.int64)
    t0 = time.monotonic()
    if is_finished(out):
        return PrepareRun(out, ids, None, None, [], None, None, progress, t0)
    scorer = Scorer(params, config)
    if not has_eval(out):
        if progress:
            progress(PrepareProgress("eval", 0, len(ids), 0.0, None))
        write_eval(out, scorer, eval_set)
    mu_x, mu_y = read_eval_means(out)
    plan = plan_chunks(ids, config)
    todo = plan.pending(out)
    done = len(ids) - sum(plan.n_rows(c) for c in todo)
    return PrepareRun(out, ids, scorer, plan, todo, mu_x, mu_y, progress, t0, done)


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
    run = start(pool, eval_set, params, config, out_dir, progress)
    for c in run.todo:
        bs = run.plan.chunks[c]
        batches = [run.plan.batches[b] for b in bs]
        write_chunk(
            run.out, run.scorer.chunk(c, pool, run.ids, bs, batches, run.mu_x, run.mu_y, run.plan.n_curv)
        )
        run.chunk_written(c)
    return run.finish()


def pool_batches(
    pool: FeatureSource, config: PrepareConfig, expect_fingerprint: str | None = None
) -> list[np.ndarray]:
    """The store rows of each batch, exactly as prepare forms them (hashed (seed, pair_id) order)."""
    ids = np.asarray(pool.pair_ids(), dtype=np.int64)
    if expect_fingerprint is not None and fingerprint(ids) != expect_fingerprint:
        raise PrepareError("these pool features hold other pairs than the scoring cache was prepared from")
    return np.array_split(hashed_order(ids, config.seed), n_batches(len(ids), config.batch_size))


def exact_batches(
    cache: ScoringCache, pool: FeatureSource, params: EndpointParams, which: range | None = None
):
    """(batch number, BatchState) of the cache's pool batches, recomputed from features in params' dtype."""
    batches = pool_batches(pool, cache.config, cache.record["pool_fingerprint"])
    for b in which if which is not None else range(len(batches)):
        h, t = pool.rows(batches[b])
        yield b, batch_state(as_tensor(h, params.W_v), as_tensor(t, params.W_v), params)
