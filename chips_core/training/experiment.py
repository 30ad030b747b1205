"""The method comparison: for each method x ratio x seed, select, continually pre-train and evaluate.

Every cell uses the same scoring cache, the same CPT recipe and the same evaluation set (a held-out test
split, never the validation split the scores were computed against). Seeds set both the CPT seed and the
random baseline's seed; deterministic methods give the same selection for every seed. A full-pool cell
(ratio 1) and the starting model without CPT ('none') are the two references. Results: one row per cell
in `cells.csv`, mean/std per method x ratio in `summary.csv`, the primary metric as `summary.md`, and the
metric-vs-ratio plot as `plot.html` (plotly, its JavaScript beside it: no network needed to view) and
`plot.png` (drawn with PIL: kaleido and matplotlib are not installed). A rerun with the same `out_dir`
skips cells already in `cells.csv`.

TracIn needs scoring caches from checkpoints of a short warm-up CPT run: `tracin_checkpoints` featurizes
the pool and eval set once PER CHECKPOINT (the encoders change with every checkpoint, so nothing can be
reused) and prepares one cache each, weighted by that epoch's mean learning rate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chips_core.engines.pipeline import load_cache
from chips_core.scoring.params import RankParams
from chips_core.training.cpt import Recipe
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, atomic_path, atomic_write_bytes

REFERENCES = ("full", "none")  # full pool (ratio 1) and the starting model without CPT (ratio 0)
KEY = ["method", "ratio", "seed"]


def tracin_checkpoints(
    ws: Workspace, pool: str, eval_name: str, warmup_run_id: int, config: Any, device: str = "cpu"
) -> list[tuple[Any, float]]:
    """(ScoringCache, eta) per checkpoint of a warm-up CPT run, for ranking.rank(method='tracin').

    Costs one featurize pass of the pool and of the eval set per checkpoint, plus one prepare each.
    eta is the mean learning rate of the epoch that ended at the checkpoint (from cpt_progress).
    """
    from chips_core.engines.pipeline import prepare_workspace
    from chips_core.features.featurize import featurize
    from chips_core.training import cpt

    info = cpt.run_config(ws, warmup_run_id)
    steps = info["config"]["steps_per_epoch"]
    out = []
    for ck in cpt.checkpoints(ws, warmup_run_id):
        epoch = int(ck.stem.split("_")[1])
        model, pretrained = cpt.checkpoint_model(ws, warmup_run_id, ck)
        run = featurize(ws, pool, model, pretrained, device=device)
        featurize(ws, eval_name, model, pretrained, device=device)
        with ws.connect(read_only=True) as con:
            model_id = catalog.run_model_id(con, run)
            eta = catalog.mean_lr(con, warmup_run_id, (epoch - 1) * steps, epoch * steps)
        cache_id = prepare_workspace(ws, pool, eval_name, config, model_id=model_id)
        out.append((load_cache(ws, cache_id), float(eta)))
    return out


def run_experiment(
    ws: Workspace,
    pool: str,
    eval_source: int | str | os.PathLike,
    methods: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    recipe: Recipe,
    *,
    cache: Any,
    rank_params: RankParams | None = None,
    tracin: Sequence[tuple[Any, float]] | None = None,
    include_full: bool = True,
    include_baseline: bool = True,
    out_dir: str | os.PathLike | None = None,
    primary: str = "i2t_R@1",
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Run (or complete) the comparison; returns one row per cell and writes the tables and plots.

    `cache`: the ScoringCache (or its cache_id / folder) of `pool` against the validation eval set.
    `eval_source`: the held-out test set given to evaluate (pool name/id or CSV). `rank_params`: the
    RankParams every cell starts from (alpha, k, beta, ...; default RankParams()); each cell sets its
    method, ratio and seed, and a preset method ('chips', 'chips-paper') its preset's values.
    `tracin`: from `tracin_checkpoints`, needed for 'tracin'.
    """
    from chips_core.curation import selection
    from chips_core.scoring import ranking
    from chips_core.scoring.params import PRESETS, resolve_method
    from chips_core.training import cpt
    from chips_core.training.evaluate import evaluate, evaluate_run

    say = progress or (lambda _msg: None)
    if "tracin" in methods and not tracin:
        raise ValueError("method 'tracin' needs `tracin` caches from tracin_checkpoints(...)")
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise ValueError(f"ratios must lie in (0, 1); the full pool is its own cell, got {r}")
    sc = load_cache(ws, cache)
    base = RankParams() if rank_params is None else rank_params
    out = Path(out_dir) if out_dir else ws.root / "experiments" / str(ws.new_id())
    out.mkdir(parents=True, exist_ok=True)
    spec = {"pool": pool, "eval": str(eval_source), "methods": list(methods), "ratios": list(ratios),
            "seeds": list(seeds), "recipe": asdict(recipe), "cache": str(sc.root),
            "rank_params": asdict(base), "primary": primary}  # fmt: skip
    started = out / "experiment.json"
    if started.is_file():  # a rerun resumes: its cells must rank the same way as the finished ones
        before = json.loads(started.read_text()).get("rank_params", {})
        now = json.loads(json.dumps(spec["rank_params"], default=str))
        changes = [
            f"{k}: {before.get(k, 'absent')} → {now.get(k, 'absent')}"
            for k in sorted({*before, *now})
            if before.get(k, "absent") != now.get(k, "absent")
        ]
        if changes:
            raise ValueError(
                f"{out} was started with other rank parameters ({'; '.join(changes)}); resuming would mix "
                "them in one table: use another --out"
            )
    atomic_write_bytes(started, json.dumps(spec, indent=2, default=str).encode())
    cells_path = out / "cells.csv"
    done = pd.read_csv(cells_path) if cells_path.is_file() else pd.DataFrame(columns=KEY)
    rows = done.to_dict("records")
    todo = [(m, r, s) for m in methods for r in ratios for s in seeds]
    todo += [("full", 1.0, s) for s in seeds] if include_full else []
    todo += [("none", 0.0, 0)] if include_baseline else []
    finished = {(str(m), float(r), int(s)) for m, r, s in done[KEY].itertuples(index=False)}
    for method, ratio, seed in todo:
        if (method, float(ratio), int(seed)) in finished:
            continue
        say(f"cell {method} @ {ratio:g}, seed {seed}")
        row: dict[str, Any] = {"method": method, "ratio": ratio, "seed": seed}
        if method == "none":
            row |= evaluate(ws, recipe.model, eval_source, pretrained=recipe.pretrained, device=recipe.device)
        else:
            scoring_method, preset = resolve_method("random" if method == "full" else method)
            params = base.replace(method=scoring_method, ratio=ratio, seed=seed)
            cell_cache = sc
            if preset is not None:  # a preset fixes its rank options and the cache's parameter blocks
                params = params.replace(**PRESETS[preset])
                cell_cache = _preset_cache(ws, sc, params.blocks)
            checkpoints = list(tracin) if method == "tracin" else None
            ranked = ranking.rank(cell_cache, params, checkpoints=checkpoints)
            name = f"{out.name}/{method}@{ratio:g}/seed{seed}"
            sel = selection.save_selection(ws, pool, ranked, ratio, f"experiment-{name}", method=method)
            run_id = cpt.train(ws, sel, recipe, seed=seed)
            row |= {"selection_id": sel, "cpt_run_id": run_id, "n_selected": _n_selected(ws, sel)}
            row |= evaluate_run(ws, run_id, eval_source)
        rows.append(row)
        with atomic_path(cells_path) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    cells = pd.DataFrame(rows)
    write_reports(cells, out, primary, list(methods))
    return cells


def _preset_cache(ws: Workspace, cache: Any, blocks: str) -> Any:
    """`cache` itself when it scores `blocks`, else its sibling cache with those blocks (prepared once)."""
    from chips_core.engines.pipeline import cache_with_blocks

    if cache.config.blocks == blocks:
        return cache
    cache_id = catalog.cache_id_by_dir(ws, str(cache.root))
    if cache_id is None:
        raise ValueError(f"scoring cache {cache.root} is not recorded in workspace {ws.root}")
    return load_cache(ws, cache_with_blocks(ws, cache_id, blocks))


def _n_selected(ws: Workspace, selection_id: int) -> int:
    return catalog.selection_n_selected(ws, selection_id)


def summarize(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of every metric per (method, ratio)."""
    metrics = [
        c for c in cells.columns if c not in (*KEY, "selection_id", "cpt_run_id") and _numeric(cells[c])
    ]
    g = cells.groupby(["method", "ratio"], sort=False)[metrics]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std")).join(g.size().rename("n_seeds"))
    return out.reset_index()


def _numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col)


def markdown_table(cells: pd.DataFrame, primary: str, methods: Sequence[str]) -> str:
    """The primary metric as mean ± std over seeds: one row per method, one column per ratio."""
    s = summarize(cells)
    ratios = sorted(r for r in s["ratio"].unique() if 0.0 < r < 1.0)
    head = "| method | " + " | ".join(f"r = {r:.0%}" for r in ratios) + " |"
    lines = [f"{primary} (mean ± std over seeds; n = seeds)", "", head, "|---" * (len(ratios) + 1) + "|"]

    def cell(method: str, ratio: float) -> str:
        hit = s[(s["method"] == method) & np.isclose(s["ratio"], ratio)]
        if hit.empty:
            return "—"
        m, sd, n = hit[f"{primary}_mean"].iloc[0], hit[f"{primary}_std"].iloc[0], int(hit["n_seeds"].iloc[0])
        return f"{m:.4f}" + (f" ± {sd:.4f}" if n > 1 else "") + f" (n={n})"

    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(m, r) for r in ratios) + " |")
    lines.append("")
    for ref, ratio, label in (("full", 1.0, "Full pool"), ("none", 0.0, "No CPT (starting model)")):
        if (s["method"] == ref).any():
            lines.append(f"{label}: {cell(ref, ratio)}")
    return "\n".join(lines) + "\n"


def write_reports(cells: pd.DataFrame, out: Path, primary: str, methods: Sequence[str]) -> None:
    """cells.csv, summary.csv, summary.md, plot.html and plot.png in `out` (atomic writes)."""
    import plotly.graph_objects as go

    with atomic_path(out / "cells.csv") as tmp:
        cells.to_csv(tmp, index=False)
    s = summarize(cells)
    with atomic_path(out / "summary.csv") as tmp:
        s.to_csv(tmp, index=False)
    atomic_write_bytes(out / "summary.md", markdown_table(cells, primary, methods).encode())
    series = _series(s, primary, methods)
    fig = go.Figure()
    for name, (x, y, err) in series.items():
        fig.add_trace(go.Scatter(x=x, y=y, error_y={"array": err}, mode="lines+markers", name=name))
    fig.update_layout(xaxis_title="selection ratio", yaxis_title=primary, xaxis_tickformat=".0%")
    with atomic_path(out / "plot.html") as tmp:
        fig.write_html(tmp, include_plotlyjs="directory")
    with atomic_path(out / "plot.png") as tmp:
        draw_png(series, primary).save(tmp, format="PNG")


def _series(s: pd.DataFrame, primary: str, methods: Sequence[str]) -> dict[str, tuple[list, list, list]]:
    """Per method: ratios, means and stds of the primary metric; the full pool appears at ratio 1."""
    out = {}
    full = s[s["method"] == "full"]
    for m in methods:
        part = pd.concat([s[s["method"] == m], full]).sort_values("ratio")
        out[m] = (
            part["ratio"].tolist(),
            part[f"{primary}_mean"].tolist(),
            part[f"{primary}_std"].fillna(0.0).tolist(),
        )
    return out


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def draw_png(series: dict[str, tuple[list, list, list]], ylabel: str, size: tuple[int, int] = (720, 440)):
    """A plain line chart (metric vs ratio per method) drawn with PIL; returns the image."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 170, 20, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for v in series.values() for x in v[0]] or [0.0, 1.0]
    ys = [y for v in series.values() for y in v[1] if np.isfinite(y)] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-3

    def px(x: float, y: float) -> tuple[float, float]:
        fx = left + (x - x0) / (x1 - x0) * (w - left - right)
        return fx, top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in np.linspace(0, 1, 5):
        d.text((5, px(x0, y0 + t * (y1 - y0))[1] - 6), f"{y0 + t * (y1 - y0):.3f}", fill="black")
        xt = x0 + t * (x1 - x0)
        d.text((px(xt, y0)[0] - 12, h - bottom + 6), f"{xt:.0%}", fill="black")
    d.text((left, h - 20), f"selection ratio  (y: {ylabel})", fill="black")
    for i, (name, (x, y, _)) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [px(a, b) for a, b in zip(x, y, strict=True)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for cx, cy in pts:
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        d.line([w - right + 10, top + 10 + 18 * i, w - right + 30, top + 10 + 18 * i], fill=color, width=3)
        d.text((w - right + 35, top + 4 + 18 * i), name, fill="black")
    return img
