"""CHIPS Studio core: curvature-aware influence scoring of image-text pairs for CLIP CPT.

The verbs of the pipeline, importable from here (each loads its stage on first use, so `import chips_core`
stays light and torch-free):

    ws = chips_core.Workspace.init("ws")
    chips_core.ingest(ws, "pool", "pool.csv"); chips_core.ingest(ws, "target", "target.csv", kind="eval")
    chips_core.featurize(ws, "pool", "ViT-B-32", "openai")       # and the eval set
    cache_id = chips_core.prepare_workspace(ws, "pool", "target")
    result = chips_core.rank(chips_core.load_cache(ws, cache_id), chips_core.RankParams(ratio=0.3))
    sel = chips_core.save_selection(ws, "pool", result, 0.3, "top30")
    chips_core.export_selection(ws, "top30", "csv"); chips_core.train(ws, sel, chips_core.Recipe("ViT-B-32"))

The stages live in subpackages named by the flow: pools → features → scoring → curation → training, with
workspace (store, catalog, jobs), engines (local, Ray) and cli around them (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name → the module that defines it
_VERBS = {
    "ChipsError": "chips_core.errors",
    "Workspace": "chips_core.workspace.store",
    "ingest": "chips_core.pools.ingest",
    "featurize": "chips_core.features.featurize",
    "load_model": "chips_core.features.models",
    "prepare_workspace": "chips_core.engines.pipeline",
    "PrepareConfig": "chips_core.scoring.params",
    "RankParams": "chips_core.scoring.params",
    "ScoringCache": "chips_core.scoring.cache",
    "load_cache": "chips_core.engines.pipeline",
    "rank": "chips_core.scoring.ranking",
    "record_decision": "chips_core.curation.selection",
    "save_selection": "chips_core.curation.selection",
    "export_selection": "chips_core.curation.export",
    "Recipe": "chips_core.training.cpt",
    "train": "chips_core.training.cpt",
    "evaluate": "chips_core.training.evaluate",
    "run_experiment": "chips_core.training.experiment",
}
__all__ = sorted(_VERBS)


def __getattr__(name: str) -> Any:
    if name not in _VERBS:
        raise AttributeError(f"module 'chips_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_VERBS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_VERBS])
