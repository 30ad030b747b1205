"""A tiny but real dashboard workspace, built through the library: ingest → featurize → prepare → map.

Pool: n_pool real images (seeded crops of scikit-image's bundled images) with their captions, a few of them
deliberately mis-captioned; eval set: n_eval other crops of the same sources. Model: the random-init
`chips-tiny-vit` config (offline). Used by the AppTest and Playwright tests.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from chips_core.curation import maps
from chips_core.engines.pipeline import prepare_workspace
from chips_core.features import featurize as features
from chips_core.features import models
from chips_core.pools import ingest
from chips_core.scoring.params import PrepareConfig
from chips_core.workspace import store
from tests.fixtures_build import write_images

MODEL = "chips-tiny-vit"
POOL, EVAL = "tiny-pool", "tiny-eval"


def _manifest(folder: Path, n: int, seed: int, mismatched: int = 0) -> Path:
    items = write_images(folder / "images", n, size=64, seed=seed)
    path = folder / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        for i, (img, caption, label) in enumerate(items):
            if i < mismatched:  # a planted mistake: an unrelated caption
                caption = f"axial CT of the chest with contrast, case {i}"
            w.writerow([img, caption, label])
    return path


def build_tiny_workspace(
    root: Path, n_pool: int = 48, n_eval: int = 16, k_max: int = 64, batch_size: int = 16
) -> store.Workspace:
    """Build the workspace under root/ws (sources under root/src); returns it. batch_size: prepare's
    contrastive batch (a larger one gives the untrained model smaller matching probabilities P_ii)."""
    root = Path(root)
    shutil.rmtree(root / "ws", ignore_errors=True)
    ws = store.Workspace.init(root / "ws")
    ingest.ingest(ws, POOL, _manifest(root / "src" / "pool", n_pool, seed=0, mismatched=4), label_col="label")
    ingest.ingest(ws, EVAL, _manifest(root / "src" / "eval", n_eval, seed=1), kind="eval", label_col="label")
    loaded = models.load_model(MODEL, device="cpu")
    runs = {name: features.featurize(ws, name, loaded, device="cpu", batch_size=64) for name in (POOL, EVAL)}
    config = PrepareConfig(k_max=k_max, batch_size=batch_size, curvature_pairs=n_pool)
    prepare_workspace(ws, POOL, EVAL, config)
    maps.get_map(ws, runs[POOL], features.FeatureStore(ws, runs[POOL]))
    return ws
