"""The bundled demo: turn data/demo/ (images, manifests, the project's own tiny CLIP) into a ready workspace.

`default_path()` is what the dashboard opens with no arguments: a workspace in a cache folder keyed by a
hash of the bundle (~/.cache/chips-studio/demo-<hash>; env CHIPS_DEMO_WS overrides), built on first use
through the library's real code path -- ingest (pools), featurize (features), prepare (scoring), the pool's
map (curation.maps) -- offline, in about a minute, and reused afterwards. Building is idempotent and
guarded by a file lock, so two processes asking at once build it once. `chips demo [WS]` builds it; the
dashboard runs that command as a background job recorded in the demo folder itself, which `init_folder`
makes a workspace first (claimed by the marker, so the folder is never mistaken for a user's workspace).

The bundle's ground truth (`planted`: none | mismatch | off_domain) lives in its manifests, not in the
workspace schema; `ground_truth()` returns it keyed by pair_id for tests and the UI.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from chips_core.workspace.store import Workspace, WorkspaceError, atomic_write_bytes

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
MODEL_DIR = BUNDLE_DIR / "model"
MANIFESTS = {"pool": "pool.csv", "val": "eval_val.csv", "test": "eval_test.csv", "pretrain": "pretrain.csv"}
POOL_NAME = "demo-pool"
EVAL_NAME = "demo-eval"  # the validation split: the target the scores are computed against
TEST_NAME = "demo-test"  # held out: evaluation after CPT only
MARKER = "demo.json"  # written last: its presence means the workspace is complete
PLANTED = ("none", "mismatch", "off_domain")

ProgressFn = Callable[..., None]  # progress(steps done, steps in all, stage="what runs now")


class DemoError(WorkspaceError):
    """The demo bundle is missing or broken; the message names the file."""


def model_spec() -> str:
    """The demo model as chips_core.features.models.load_model names it (an open_clip local-dir bundle)."""
    return f"local-dir:{MODEL_DIR}"


def bundle_info() -> dict:
    """data/demo/bundle.json: pair counts, sources, the training command and its time, the bundle hash."""
    path = BUNDLE_DIR / "bundle.json"
    if not path.is_file():
        raise DemoError(f"demo bundle not found: {path} (rebuild it with `python data/build_demo.py`)")
    return json.loads(path.read_text())


#: what the builder makes of the bundle; bump it when that changes (2: default and paper-preset caches;
#: 3: the pool's map)
WORKSPACE_LAYOUT = 3
_STEPS = 9  # build steps reported to `progress`: ingest and featurize three splits, prepare two caches, map


def bundle_key() -> str:
    """A short hash of what the demo workspace is built from: the bundle's manifests, model and location.

    Images are covered through bundle.json (its sha256 over every file), so this reads only small files.
    """
    h = hashlib.sha256(str(BUNDLE_DIR).encode() + b"\0" + f"layout {WORKSPACE_LAYOUT}".encode())
    files = [BUNDLE_DIR / "bundle.json", *(BUNDLE_DIR / m for m in MANIFESTS.values())]
    files += sorted(p for p in MODEL_DIR.iterdir() if p.is_file()) if MODEL_DIR.is_dir() else []
    for p in files:
        if not p.is_file():
            raise DemoError(f"demo bundle file missing: {p}")
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def manifest(split: str) -> pd.DataFrame:
    """One split's manifest with absolute file paths and each pair's pair_id (the workspace contract)."""
    from chips_core.pools.records import pair_id

    if split not in MANIFESTS:
        raise DemoError(f"unknown demo split {split!r}; expected one of {', '.join(MANIFESTS)}")
    path = BUNDLE_DIR / MANIFESTS[split]
    if not path.is_file():
        raise DemoError(f"demo manifest not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df["filepath"] = [str((BUNDLE_DIR / p).resolve()) for p in df["filepath"]]
    df["pair_id"] = [
        pair_id(Path(f).read_bytes(), c) for f, c in zip(df["filepath"], df["title"], strict=True)
    ]
    return df


def ground_truth(split: str = "pool") -> pd.DataFrame:
    """pair_id -> planted (none | mismatch | off_domain), label, caption and provenance of one split."""
    cols = ["pair_id", "planted", "label", "title", "true_caption", "source_package", "source_file"]
    return manifest(split)[cols].rename(columns={"title": "caption"})


def default_path() -> Path:
    """Where the demo workspace lives (built or not): env CHIPS_DEMO_WS, else a cache folder per bundle."""
    override = os.environ.get("CHIPS_DEMO_WS")
    if override:
        return Path(override).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chips-studio"
    return (cache / f"demo-{bundle_key()}").resolve()


def default_demo_workspace(progress: ProgressFn | None = None) -> Path:
    """The demo workspace folder, built on first use (env CHIPS_DEMO_WS overrides the cache location)."""
    path = default_path()
    build_demo_workspace(path, progress=progress)
    return path


def init_folder(path: str | os.PathLike) -> Workspace:
    """Make `path` the (not yet built) demo workspace: claimed by the marker, with an empty schema, so a
    background `chips demo` job can be recorded in its `jobs` table before the build starts. Idempotent;
    raises DemoError for a folder that holds something else (see `_claim`)."""
    root = Path(path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not is_complete(root):
        _claim(root, bundle_key())
    return Workspace.init(root)


@contextlib.contextmanager
def _locked(root: Path, say: ProgressFn) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.demo.lock", "w") as f:  # beside it: never litter a workspace
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(0, _STEPS, stage="waiting for another process that builds the demo")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` holds a finished demo workspace built from the current bundle."""
    m = _marker(Path(path))
    return bool(m and m.get("complete") and m.get("bundle_key") == bundle_key())


def _claim(root: Path, key: str) -> None:
    """Mark `root` as the demo workspace of bundle `key`; refuse a folder that is something else.

    Never builds over a user's own workspace (chips.duckdb without a demo marker) nor over a demo of
    another bundle version (ingest would keep its old pairs under the same pool names).
    """
    m = _marker(root)
    if m is None and (root / "chips.duckdb").exists():
        raise DemoError(f"{root} is a CHIPS workspace but not the demo's; choose another folder for the demo")
    if m is not None and m.get("bundle_key") != key:
        raise DemoError(
            f"{root} holds a demo built from another version of data/demo (bundle {m.get('bundle_key')}, "
            f"now {key}); delete the folder or point CHIPS_DEMO_WS elsewhere"
        )
    if m is None:
        atomic_write_bytes(root / MARKER, json.dumps({"bundle_key": key, "complete": False}).encode())


def build_demo_workspace(path: str | os.PathLike, progress: ProgressFn | None = None) -> Workspace:
    """Build (or reuse) the demo workspace at `path`: ingest -> featurize -> prepare -> map; idempotent.

    Every step is the library's own and skips work already done, so a killed build resumes on re-run.
    progress(done, total, stage=text) is called before each of the build's steps and at the end.
    Raises DemoError for a folder that holds something else (see `_claim`).
    """
    from chips_core.features.featurize import featurize
    from chips_core.pools.ingest import ingest

    root = Path(path).expanduser().resolve()
    say = progress or (lambda *_a, **_k: None)
    with _locked(root, say):
        if is_complete(root):
            say(_STEPS, _STEPS, stage="already built")
            return Workspace(root)
        key = bundle_key()
        _claim(root, key)
        ws = Workspace.init(root)
        runs = {}
        for i, (name, split, kind) in enumerate(
            ((POOL_NAME, "pool", "pool"), (EVAL_NAME, "val", "eval"), (TEST_NAME, "test", "eval"))
        ):
            say(2 * i, _STEPS, stage=f"ingesting the {split} split as {name!r}")
            summary = ingest(ws, name, BUNDLE_DIR / MANIFESTS[split], kind=kind, label_col="label", workers=0)
            if summary.n_rejects:
                raise DemoError(f"demo {split} split: {summary.n_rejects} rejected pairs\n{summary.format()}")
            say(2 * i + 1, _STEPS, stage=f"featurizing {name!r}")
            runs[name] = featurize(ws, name, model_spec(), device="cpu", batch_size=256)
        cache_id = _prepare(ws, say)
        _map(ws, runs[POOL_NAME], say)
        info = {"bundle_key": key, "complete": True, "pool": POOL_NAME, "eval": EVAL_NAME, "test": TEST_NAME,
                "model": model_spec(), "feature_runs": runs, "cache_id": cache_id}  # fmt: skip
        atomic_write_bytes(root / MARKER, (json.dumps(info, indent=2) + "\n").encode())
        say(_STEPS, _STEPS, stage="ready")
        return ws


def _prepare(ws: Workspace, say: ProgressFn) -> int:
    """The demo's scoring caches through the CLI's workspace-level prepare: the paper preset's blocks, then
    the default PrepareConfig (CPU), so the dashboard's preset switch needs no job; returns the default's."""
    from chips_core.engines.pipeline import prepare_workspace
    from chips_core.scoring.params import PRESETS, PrepareConfig

    paper = PrepareConfig(device="cpu", blocks=PRESETS["paper"]["blocks"])
    say(_STEPS - 3, _STEPS, stage="preparing the scoring cache of the paper preset")
    prepare_workspace(ws, POOL_NAME, EVAL_NAME, paper)
    say(_STEPS - 2, _STEPS, stage="preparing the default scoring cache")
    return prepare_workspace(ws, POOL_NAME, EVAL_NAME, PrepareConfig(device="cpu"))


def _map(ws: Workspace, run_id: int, say: ProgressFn) -> None:
    """The pool's map (UMAP of its image and text features), as `chips prepare` leaves it, so the demo's
    first Map visit opens at once instead of starting a job; a resumed build keeps a map already made."""
    from chips_core.curation import maps
    from chips_core.features.featurize import FeatureStore

    say(_STEPS - 1, _STEPS, stage=f"drawing the map of {POOL_NAME!r}")
    maps.get_map(ws, run_id, FeatureStore(ws, run_id))
