"""Dashboard speed per action on a 100,000-pair workspace: slider steps, page openings and an include click.

Measured in the real browser: `streamlit run app/main.py` on a synthetic workspace (random features with
structure written as a real feature store, a real scoring cache made by chips_core.scoring.prepare.prepare,
a stored map, real pairs rows pointing at a few real images) driven by headless Debian Chromium through
Playwright. Times are seconds from the user's action:
  first Scores load – the server's first page, from opening the URL until: shell (Streamlit's own page is
                      mounted, before any of the script's output: the frontend's floor), title (the page's
                      heading), shown (the score histograms are drawn), idle (the run is done);
  the floor         – the same first load of a server whose app only writes the title (a fresh server in the
                      same run): what Streamlit itself takes on this machine before any of our code runs;
  another session   – the Scores page opened again (a new session, as a reload or a second user makes);
  slider steps      – for each slider (α, λ, ratio) one arrow key, until: metrics (the dependent headline
                      metric shows its new value), charts (the score histograms hold new data), idle (the
                      script run has finished: the ranking table and everything else is drawn);
  open Map / Browse – a click on the page's link in the sidebar, until: shown (the map's WebGL points / the
                      first pair card's Include button are there), idle (the run has finished);
  include click     – a click on a Browse card's Include, until: shown (that card shows "included" and its
                      Include button is disabled), idle.
The map is stored before the dashboard starts, as the prepare job leaves it; its coordinates are a PCA of the
features, not UMAP (UMAP of 100k points takes many minutes here, and the page reads either the same way).
Server-side `rank` time of the same cache is printed beside it for reference.

    /work/venv/bin/python bench/bench_dashboard.py [--pairs 100000] [--repeats 5] [--k-max 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chips_core.curation import maps  # noqa: E402
from chips_core.scoring.endpoint import EndpointParams  # noqa: E402
from chips_core.scoring.params import PrepareConfig, RankParams  # noqa: E402
from chips_core.scoring.prepare import ArrayFeatures, prepare  # noqa: E402
from chips_core.scoring.ranking import rank, store_rankings  # noqa: E402
from chips_core.workspace import store  # noqa: E402
from tests.browser.harness import chromium_page, streamlit_server, wait_idle  # noqa: E402
from tests.fixtures_build import write_images  # noqa: E402

D, D_V, D_T = 64, 96, 64


def _features(n: int, rng: np.random.Generator, centres: tuple[np.ndarray, np.ndarray]) -> ArrayFeatures:
    """Clustered random features (so rankings have structure), fp16 like a real feature store."""
    group = rng.integers(0, len(centres[0]), size=n)
    h = (centres[0][group] + rng.normal(size=(n, D_V))).astype(np.float16)
    t = (centres[1][group] + rng.normal(size=(n, D_T))).astype(np.float16)
    ids = rng.choice(np.iinfo(np.int64).max, size=n, replace=False).astype(np.int64)
    return ArrayFeatures(ids, h, t)


def _feature_store(folder: Path, src: ArrayFeatures) -> None:
    """`src` as a one-shard feature store (chips_core.features.featurize.FeatureStore reads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    h, t = src.rows(np.arange(len(src)))
    for part, arr in (("ids", src.pair_ids()), ("h", h), ("t", t)):
        np.save(folder / f"shard-00000-{part}.npy", arr)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of the L2-normalised rows (float32): the bench's stand-in map."""
    x = x.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x[:20_000], full_matrices=False)
    return (x @ vt[:2].T).astype(np.float32)


def build_workspace(root: Path, n_pairs: int, n_eval: int, k_max: int) -> tuple[store.Workspace, Path]:
    """A workspace with an n_pairs synthetic pool, its feature store and map, and a finished scoring cache;
    returns (ws, cache dir)."""
    ws = store.Workspace.init(root / "ws")
    rng = np.random.default_rng(0)
    centres = (rng.normal(size=(12, D_V)) * 2, rng.normal(size=(12, D_T)) * 2)
    pool, ev = _features(n_pairs, rng, centres), _features(n_eval, rng, centres)
    images = [str(p) for p, _, _ in write_images(root / "images", 16, size=64)]
    with ws.connect() as con:
        for pool_id, kind, src in ((1, "pool", pool), (2, "eval", ev)):
            name = f"synthetic-{kind}"
            con.execute(
                "INSERT INTO pools (pool_id, name, kind, source, format, status) "
                "VALUES (?, ?, ?, 'synthetic', 'synthetic', 'done')",
                [pool_id, name, kind],
            )
            n = len(src)
            con.register(
                "_p",
                pd.DataFrame(
                    {
                        "pool_id": pool_id,
                        "pair_id": src.pair_ids(),
                        "row_index": np.arange(n),
                        "filepath": [images[i % len(images)] for i in range(n)],
                        "caption": [
                            f"synthetic {kind} pair {i}, cluster-structured features" for i in range(n)
                        ],
                    }
                ),
            )
            con.execute("INSERT INTO pairs (pool_id, pair_id, row_index, filepath, caption) SELECT * FROM _p")
            con.unregister("_p")
            features_dir = ws.root / "features" / name
            _feature_store(features_dir, src)
            con.execute(
                "INSERT INTO feature_runs (run_id, pool_id, model_id, status, dir, n_pairs, d_v, d_t) "
                "VALUES (?, ?, 0, 'done', ?, ?, ?, ?)",
                [10 + pool_id, pool_id, str(features_dir), n, D_V, D_T],
            )
            con.execute(
                "INSERT INTO feature_shards (run_id, shard_index, n_rows, first_row) VALUES (?, 0, ?, 0)",
                [10 + pool_id, n],
            )
    h, t = pool.rows(np.arange(n_pairs))
    fmap = maps.FeatureMap(pool.pair_ids(), _pca_2d(h), _pca_2d(t), n_pairs, False)
    maps.save_map(ws, 11, fmap, {"method": "PCA (bench stand-in for UMAP)"})
    params = EndpointParams(
        torch.randn(D, D_V, generator=torch.Generator().manual_seed(1)) / D_V**0.5,
        torch.randn(D, D_T, generator=torch.Generator().manual_seed(2)) / D_T**0.5,
        torch.tensor(np.log(20.0)),
    )
    cfg = PrepareConfig(k_max=k_max, batch_size=1024, curvature_pairs=min(n_pairs, 20_000))
    out = ws.root / "caches" / "synthetic"
    t0 = time.perf_counter()
    store_rankings(prepare(pool, ev, params, cfg, out))  # as the prepare job (engines/pipeline.py) does
    print(f"prepare: {n_pairs:,} pairs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    with ws.connect() as con:
        con.execute(
            "INSERT INTO scoring_caches (cache_id, pool_run_id, eval_run_id, config, dir, status) "
            "VALUES (100, 11, 12, ?, ?, 'done')",
            [json.dumps(dataclasses.asdict(cfg)), str(out)],
        )
    return ws, out


_METRIC = (
    "(label) => { const m = [...document.querySelectorAll(\"[data-testid='stMetric']\")].find(m =>"
    " m.querySelector(\"[data-testid='stMetricLabel']\").innerText.trim() === label);"
    " return m ? m.querySelector(\"[data-testid='stMetricValue']\").innerText.trim() : null; }"
)


def _metric(page, label: str) -> str:
    """The value shown by the metric tile whose label is exactly `label`."""
    return page.evaluate(_METRIC, label)


# the Scores page's histograms drawn: inline SVG (app/histograms.py), or plotly's bars (before 2026-12-01,
# for --app on an older checkout)
HISTOGRAMS = ".chips-histograms svg rect, [data-testid='stPlotlyChart'] .js-plotly-plot .bars"
_CHART_DATA = (
    "() => { const f = [...document.querySelectorAll('.chips-histograms figure')];"
    " if (f.length) return f.map(e => e.getAttribute('data-counts')).join('|');"
    " const g = document.querySelector(\"[data-testid='stPlotlyChart'] .js-plotly-plot\");"
    " return g && g.data ? JSON.stringify(g.data.map(d => d.y)) : ''; }"
)
# when each stage of the first load happened (ms after navigation start), recorded in the page
_FIRST_LOAD_MARKS = """
window.__marks = {};
const mark = (k) => { if (!(k in window.__marks)) window.__marks[k] = performance.now(); };
new MutationObserver(() => {
  if (document.querySelector("[data-testid='stApp']")) mark('shell');
  if ([...document.querySelectorAll('h1')].some(e => e.innerText.trim() === 'Scores')) mark('title');
  if (document.querySelector("HISTOGRAMS")) mark('shown');
}).observe(document, {subtree: true, childList: true});
""".replace("HISTOGRAMS", HISTOGRAMS)


def measure(page, slider: str, metric: str, key: str, repeats: int) -> dict[str, list[float]]:
    """Press `key` on a slider `repeats` times; seconds until the metric, the charts and the run are done."""
    out: dict[str, list[float]] = {"metrics": [], "charts": [], "idle": []}
    handle = page.get_by_role("slider", name=slider)
    for _ in range(repeats):
        before_metric, before_chart = _metric(page, metric), page.evaluate(_CHART_DATA)
        handle.focus()
        t0 = time.perf_counter()
        handle.press(key)
        changed = f"([m, old]) => ({_METRIC})(m) !== old"
        page.wait_for_function(changed, arg=[metric, before_metric], polling=10)
        out["metrics"].append(time.perf_counter() - t0)
        page.wait_for_function(f"(old) => ({_CHART_DATA})() !== old", arg=before_chart, polling=10)
        out["charts"].append(time.perf_counter() - t0)
        wait_idle(page)
        out["idle"].append(time.perf_counter() - t0)
    return out


# the Scores page's expander for ML engineers: it holds the λ tile (a closed expander's tiles are not drawn)
ENGINEERS = "How a pair is compared with the target (for ML engineers)"


def open_engineers_figures(page) -> None:
    """Open the Scores page's expander for ML engineers, so that the λ tile a step waits for is drawn."""
    page.locator("[data-testid='stExpander'] summary").filter(has_text=ENGINEERS).first.click()
    page.wait_for_function(f"() => ({_METRIC})('λ') !== null", polling=50)


_MAP_DRAWN = (
    "() => [...document.querySelectorAll(\"[data-testid='stPlotlyChart'] .js-plotly-plot\")]"
    ".some(g => g.data && g.data.length && g.data[0].type === 'scattergl')"
)


_BROWSE_CARD = "() => !!document.querySelector(\"[class*='st-key-top-inc-'] button\")"


def open_page(page, link: str, shown: str, repeats: int) -> dict[str, list[float]]:
    """Go to Scores, then click the sidebar link `link`; seconds until the JS condition `shown` holds and
    until the run is done."""
    out: dict[str, list[float]] = {"shown": [], "idle": []}
    for _ in range(repeats):
        page.get_by_role("link", name="Scores", exact=True).click()
        page.locator(HISTOGRAMS).first.wait_for(timeout=300_000)
        wait_idle(page, timeout_ms=300_000)
        t0 = time.perf_counter()
        page.get_by_role("link", name=link, exact=True).click()
        page.wait_for_function(shown, polling=20, timeout=300_000)
        out["shown"].append(time.perf_counter() - t0)
        wait_idle(page, timeout_ms=300_000)
        out["idle"].append(time.perf_counter() - t0)
    return out


_CARD_IDS = "els => els.map(e => (e.className.match(/st-key-top-inc-(-?\\d+)/) || [])[1]).filter(Boolean)"
_INCLUDED = (
    "(pid) => { const b = document.querySelector(`.st-key-top-inc-${pid} button`);"
    " if (!b || !b.disabled) return false;"
    " const card = b.closest(\"[data-testid='stVerticalBlock']\").parentElement.closest("
    "\"[data-testid='stVerticalBlock']\");"
    " return [...card.querySelectorAll('span')].some(s => s.innerText.trim() === 'included'); }"
)


def include_clicks(page, repeats: int) -> dict[str, list[float]]:
    """On Browse, click Include on `repeats` cards of the Top tab; seconds until the card shows it."""
    out: dict[str, list[float]] = {"shown": [], "idle": []}
    pids = page.locator("[class*='st-key-top-inc-']").evaluate_all(_CARD_IDS)
    for pid in pids[:repeats]:
        t0 = time.perf_counter()
        page.locator(f".st-key-top-inc-{pid} button").first.click()
        page.wait_for_function(_INCLUDED, arg=pid, polling=10, timeout=120_000)
        out["shown"].append(time.perf_counter() - t0)
        wait_idle(page)
        out["idle"].append(time.perf_counter() - t0)
    return out


def load_phases(page, url: str, what: str, done: str) -> list[tuple[str, str, float, float]]:
    """Open `url` in `page` (a new session of the server); seconds from the navigation until each stage of
    _FIRST_LOAD_MARKS and until the run is done (`done`: the element that is there when the page is drawn)."""
    wall0, t0 = time.time(), time.perf_counter()
    page.goto(url)
    page.locator(done).first.wait_for(timeout=300_000)
    wait_idle(page)
    idle = time.perf_counter() - t0
    # the marks count from the navigation's start (performance.timeOrigin, wall clock): from goto's here
    origin = page.evaluate("performance.timeOrigin") / 1000 - wall0
    marks = page.evaluate("window.__marks")
    at = {stage: origin + marks[stage] / 1000 for stage in ("shell", "title", "shown") if stage in marks}
    return [(what, stage, t, t) for stage, t in [*at.items(), ("idle", idle)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--eval-pairs", type=int, default=512)
    ap.add_argument("--k-max", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-sliders", action="store_true", help="measure page openings and clicks only")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "dashboard")
    ap.add_argument(
        "--app",
        type=Path,
        default=ROOT,
        help="the checkout whose app/main.py is served (default this one; another, e.g. main's, to compare)",
    )
    args = ap.parse_args()

    import shutil

    load0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    shutil.rmtree(args.out, ignore_errors=True)
    ws, cache_dir = build_workspace(args.out, args.pairs, args.eval_pairs, args.k_max)
    from chips_core.scoring.cache import ScoringCache

    cache = ScoringCache.load(cache_dir)
    rank_s = []
    for alpha in (0.7, 0.65, 0.6, 0.55, 0.5):
        t0 = time.perf_counter()
        rank(cache, RankParams(alpha=alpha, k=args.k_max // 2))
        rank_s.append(time.perf_counter() - t0)

    rows = [("rank() in-process, chips, k=k_max/2", "—", statistics.median(rank_s), max(rank_s))]
    floor = args.out / "floor"  # Streamlit's own floor: an app that only writes the page's title
    (floor / "app").mkdir(parents=True)
    (floor / "app" / "main.py").write_text('import streamlit as st\n\nst.title("Scores")\n')
    with streamlit_server(ws.root, args.out / "floor.log", root=floor) as url, chromium_page() as page:
        page.add_init_script(_FIRST_LOAD_MARKS)
        rows += load_phases(page, url, "first load, a title-only app (the floor)", "h1")

    server = streamlit_server(ws.root, args.out / "streamlit.log", root=args.app)
    with server as url, chromium_page() as page:
        page.add_init_script(_FIRST_LOAD_MARKS)
        rows += load_phases(page, url, "first Scores load", HISTOGRAMS)
        rows += load_phases(page, url, "Scores load, another session", HISTOGRAMS)
        sliders = (
            ("α — how much confusions with other pairs count", "λ", "ArrowLeft"),
            ("λ — caution of the estimate (× the default)", "λ", "ArrowRight"),
            ("Selection ratio r", "Selected", "ArrowRight"),
        )
        if not args.skip_sliders:
            open_engineers_figures(page)
        for slider, metric, key in () if args.skip_sliders else sliders:
            times = measure(page, slider, metric, key, args.repeats)
            for stage, values in times.items():
                rows.append(
                    (f"slider {slider.split(' ')[0]} step", stage, statistics.median(values), max(values))
                )
        page.screenshot(path=str(args.out / "scores-100k.png"))
        n_open = min(args.repeats, 3)
        for link, shown in (("Map", _MAP_DRAWN), ("Browse", _BROWSE_CARD)):
            for stage, values in open_page(page, link, shown, n_open).items():
                rows.append((f"open {link} (from Scores)", stage, statistics.median(values), max(values)))
        page.screenshot(path=str(args.out / "browse-100k.png"))
        for stage, values in include_clicks(page, args.repeats).items():
            rows.append(("include click on a Browse card", stage, statistics.median(values), max(values)))

    print()
    print(
        f"Dashboard, {args.pairs:,} pairs, k_max {args.k_max}, {args.repeats} steps per slider and include "
        f"clicks, {min(args.repeats, 3)} openings per page; seconds"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load0} at the start, {load} at the end (other work "
          "slows every figure)")  # fmt: skip
    print(f"app: {args.app}")
    print()
    print(f"| {'what':<44} | {'until':<8} | {'median':>7} | {'max':>7} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 9}|{'-' * 9}|")
    for what, until, med, mx in rows:
        print(f"| {what:<44} | {until:<8} | {med:7.3f} | {mx:7.3f} |")


if __name__ == "__main__":
    main()
