"""The bundled demo: the committed bundle is complete and loadable, and building the demo workspace through
the real library path (ingest -> featurize -> prepare) yields pairs, features and a scoring cache on which the
CHIPS ranking pushes the planted mistakes down."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from chips_core import demo
from chips_core.workspace.store import Workspace

pytestmark = pytest.mark.integration
PROVENANCE = ["source_package", "source_file", "source_frame", "source_license", "augmentation"]


def _bundle_files() -> list[Path]:
    return [p for p in demo.BUNDLE_DIR.rglob("*") if p.is_file()]


def test_bundle_manifests_complete_and_disjoint():
    info = demo.bundle_info()
    ids: dict[str, set[int]] = {}
    for split in demo.MANIFESTS:
        df = demo.manifest(split)
        assert list(df.columns[:2]) == ["filepath", "title"]
        for col in ["label", "planted", "split", "true_caption", *PROVENANCE]:
            assert col in df.columns, f"{split}: missing column {col}"
        assert (df["source_license"].str.len() > 0).all() and (df["source_file"].str.len() > 0).all()
        assert set(df["planted"]) <= set(demo.PLANTED)
        assert (df["split"] == split).all()
        assert df["pair_id"].is_unique, f"{split}: duplicate pairs"
        assert len(df) == info["pairs"][split]
        ids[split] = set(df["pair_id"])
        if split != "pool":
            assert (df["planted"] == "none").all(), f"{split} must be clean"
    splits = list(ids)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not ids[a] & ids[b], f"splits {a} and {b} share pairs"
    pool = demo.manifest("pool")
    counts = pool["planted"].value_counts()
    assert 600 <= len(pool) <= 1500
    assert counts["mismatch"] >= 50 and counts["off_domain"] >= 50
    assert 100 <= len(ids["val"]) <= 200 and len(ids["test"]) >= 100
    mism = pool[pool["planted"] == "mismatch"]
    assert (mism["true_caption"] != mism["title"]).all() and (mism["true_caption"].str.len() > 0).all()
    assert (pool.loc[pool["planted"] == "off_domain", "label"] == "digit").all()
    # target-domain labels come from more than one package (DICOM files and scikit-image images)
    clean = pool[pool["planted"] == "none"]
    assert {"pydicom", "pydicom-data", "skimage"} <= set(clean["source_package"])


# "a" before a vowel sound (ultrasound, MR/MRI/X-ray read letter by letter), "an" before a consonant sound
VOWEL_SOUND = r"[aeiouAEIOU]|MRI?\b|X-ray"
WRONG_ARTICLE = re.compile(rf"(?:^|[\s,(:])(?:a (?={VOWEL_SOUND})|an (?!{VOWEL_SOUND}))")


def test_bundle_captions_clean():
    """No shipped caption carries a DICOM leftover ("series marked lesion<MPR Collection>") or an article slip
    ("a ultrasound image"); data/build_demo.py cleans them (tests/unit/test_build_demo.py)."""
    for split in demo.MANIFESTS:
        df = demo.manifest(split)
        for col in ("title", "true_caption"):
            texts = df[col].fillna("").astype(str)
            leftovers = texts[texts.str.contains("[<>^]", regex=True)]
            assert leftovers.empty, f"{split}.{col}: {leftovers.head(3).tolist()}"
            slips = texts[texts.str.contains(WRONG_ARTICLE)]
            assert slips.empty, f"{split}.{col}: {slips.head(3).tolist()}"
            spaces = texts.str.contains(r"\s{2}|\s,|^\s|\s$", regex=True)
            assert not spaces.any(), f"{split}.{col}: stray spaces {texts[spaces].head(3).tolist()}"
    # the cleaned texts are still there
    titles = pd.concat([demo.manifest(s)["title"] for s in demo.MANIFESTS])
    assert titles.str.contains("series marked lesion", regex=False).any()
    assert titles.str.contains("an ultrasound image", regex=False).any()


def test_bundle_images_and_size():
    df = demo.manifest("pool").sample(60, random_state=0)
    for f in df["filepath"]:
        with Image.open(f) as im:
            im.load()
            assert 64 <= min(im.size) <= max(im.size) <= 128, f
    total = sum(p.stat().st_size for p in _bundle_files())
    assert total < 30e6, f"bundle is {total / 1e6:.1f} MB"
    assert demo.bundle_info()["bundle_bytes"] == sum(
        p.stat().st_size for p in _bundle_files() if p.name != "bundle.json"
    )


def test_model_loads_weights_only_and_encodes():
    from chips_core.features.models import load_model
    from chips_core.pools.records import load_image

    ckpt = next(demo.MODEL_DIR.glob("*.bin"))
    assert ckpt.stat().st_size <= 20e6
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    loaded = load_model(demo.model_spec())
    assert loaded.identity.checkpoint_sha256 is not None
    val = demo.manifest("val").iloc[:32]
    images = torch.stack([loaded.preprocess(load_image(f)) for f in val["filepath"]])
    h, t = loaded.encode(images, loaded.tokenizer(list(val["title"])))
    p = loaded.adapter.endpoint_params()
    x = torch.nn.functional.normalize(h.double() @ p.W_v.double().T, dim=-1)
    y = torch.nn.functional.normalize(t.double() @ p.W_t.double().T, dim=-1)
    # trained, not random: matching pairs are more similar than mismatched ones
    assert (x * y).sum(1).mean() > (x @ y.T).mean() + 0.1


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    return demo.build_demo_workspace(tmp_path_factory.mktemp("demo") / "ws")


@pytest.mark.slow
def test_build_demo_workspace(built):
    info = json.loads((built.root / demo.MARKER).read_text())
    assert info["bundle_key"] == demo.bundle_key()
    with built.connect(read_only=True) as con:
        n = dict(
            con.execute(
                "SELECT name, count(*) FROM pairs JOIN pools USING (pool_id) GROUP BY name"
            ).fetchall()
        )
        runs = con.execute("SELECT run_id, n_pairs, status FROM feature_runs ORDER BY run_id").fetchall()
        cache = con.execute(
            "SELECT status, dir FROM scoring_caches WHERE cache_id = ?", [info["cache_id"]]
        ).fetchone()
        rejects = con.execute("SELECT count(*) FROM rejects").fetchone()[0]
    assert n == {
        demo.POOL_NAME: len(demo.manifest("pool")),
        demo.EVAL_NAME: len(demo.manifest("val")),
        demo.TEST_NAME: len(demo.manifest("test")),
    }
    assert rejects == 0
    assert len(runs) == 3 and all(r[2] == "done" for r in runs)
    assert cache[0] == "done" and (Path(cache[1]) / "meta.json").is_file()
    # the workspace's pair ids are the bundle's ground-truth ids
    with built.connect(read_only=True) as con:
        ws_ids = {r[0] for r in con.execute(
            "SELECT pair_id FROM pairs JOIN pools USING (pool_id) WHERE name = ?", [demo.POOL_NAME]
        ).fetchall()}  # fmt: skip
    assert ws_ids == set(demo.ground_truth("pool")["pair_id"])
    # the pool's map is stored by the build, so the first Map visit runs no UMAP job
    from chips_core.curation import maps

    fmap = maps.load_map(built, info["feature_runs"][demo.POOL_NAME])
    assert fmap is not None and not fmap.sampled
    assert set(fmap.pair_ids.tolist()) == ws_ids and fmap.image_xy.shape == (len(ws_ids), 2)


@pytest.mark.slow
def test_build_is_idempotent(built):
    with built.connect(read_only=True) as con:
        before = con.execute(
            "SELECT (SELECT count(*) FROM pairs), (SELECT max(run_id) FROM feature_runs)"
        ).fetchone()
    again = demo.build_demo_workspace(built.root)
    with again.connect(read_only=True) as con:
        after = con.execute(
            "SELECT (SELECT count(*) FROM pairs), (SELECT max(run_id) FROM feature_runs)"
        ).fetchone()
    assert before == after


def _bottom_half_share(frame: pd.DataFrame, truth: pd.DataFrame, kind: str) -> float:
    t = frame.merge(truth, on="pair_id", validate="one_to_one")
    assert len(t) == len(frame)
    return float((t.loc[t["planted"] == kind, "rank"] > len(t) / 2).mean())


@pytest.mark.slow
def test_chips_pushes_planted_pairs_down(built):
    from chips_core.scoring.cache import ScoringCache
    from chips_core.scoring.params import RankParams
    from chips_core.scoring.ranking import rank

    info = json.loads((built.root / demo.MARKER).read_text())
    with built.connect(read_only=True) as con:
        cache_dir = con.execute(
            "SELECT dir FROM scoring_caches WHERE cache_id = ?", [info["cache_id"]]
        ).fetchone()[0]
    cache = ScoringCache.load(cache_dir)
    truth = demo.ground_truth("pool")
    planted = truth.assign(planted=truth["planted"].replace({"mismatch": "planted", "off_domain": "planted"}))
    random_shares = [
        _bottom_half_share(rank(cache, RankParams(method="random", seed=s)).frame, planted, "planted")
        for s in range(20)
    ]
    # a random ranking puts about half of the planted pairs in the bottom half; CHIPS clearly more
    assert abs(np.mean(random_shares) - 0.5) < 0.05
    margin = 3 * max(np.std(random_shares), 0.5 / np.sqrt((planted["planted"] == "planted").sum()))
    chips = rank(cache, RankParams(method="chips")).frame
    share = _bottom_half_share(chips, planted, "planted")
    assert share >= 0.5 + margin and share >= 0.6, (
        f"CHIPS put {share:.0%} of planted pairs in the bottom half"
    )
    # mismatched captions are what the influence score and the agreement catch (measured: 97 % with the
    # CLIPScore weight 0.25, 95 % without; 85 % with the influence score alone) ...
    assert _bottom_half_share(chips, truth, "mismatch") >= 0.8
    # ... and off-domain pairs stay out of the default's top 30 % (pool rate 12.5 %; measured 1.7 %, 0 %
    # without the CLIPScore weight, 19.1 % with 0.75; 5.9 % without the agreement; docs/SCORING.md)
    top30 = truth.set_index("pair_id")["planted"].reindex(chips.nsmallest(288, "rank")["pair_id"].to_numpy())
    assert (top30 == "off_domain").mean() <= 0.03125
    # with raw gradients (the paper preset) off-domain pairs get Â near 0 and only the soft relevance weight;
    # the rank-normalised option (METHOD.md §6) pushes them down (measured: 84 %)
    ranked_norm = rank(
        cache,
        RankParams(
            method="chips",
            rank_normalized=True,
            normalize=False,
            damping="dimension",
            agreement=0.0,
            clipscore_weight=0.0,
        ),
    ).frame
    assert _bottom_half_share(ranked_norm, truth, "off_domain") >= 0.8


@pytest.mark.slow
def test_default_demo_workspace_reuses_a_built_one(built):
    # CHIPS_DEMO_WS points the default at the built workspace; a subprocess keeps the override out of other
    # tests. A complete workspace of the current bundle is reused as is: no new rows, no new feature run.
    code = "from chips_core import demo; print(demo.default_demo_workspace())"
    env = dict(os.environ, CHIPS_DEMO_WS=str(built.root))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip().splitlines()[-1]) == built.root
    assert demo.is_complete(built.root)


def test_refuses_to_build_over_other_folders(tmp_path):
    own = Workspace.init(tmp_path / "mine")  # a user's workspace: never turned into the demo
    with pytest.raises(demo.DemoError, match="not the demo's"):
        demo.build_demo_workspace(own.root)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / demo.MARKER).write_text(json.dumps({"bundle_key": "0" * 16, "complete": True}))
    with pytest.raises(demo.DemoError, match="another version"):
        demo.build_demo_workspace(stale)
    assert not demo.is_complete(stale)


@pytest.mark.slow
def test_default_top_ranks_hold_no_planted_mismatch(built):
    """What a clinician checks first on Browse: the default preset's top 10 holds no planted caption
    mistake, and its top 10 % at most half the pool's rate; the paper's literal score (kept as a preset)
    lifts them there on this demo, which is what the default fixes (docs/SCORING.md)."""
    from chips_core.scoring.cache import ScoringCache
    from chips_core.scoring.params import PRESETS, RankParams
    from chips_core.scoring.ranking import rank

    truth = demo.ground_truth("pool").set_index("pair_id")["planted"]
    with built.connect(read_only=True) as con:
        dirs = dict(con.execute("SELECT config->>'blocks', dir FROM scoring_caches").fetchall())
    assert set(dirs) == {PRESETS["default"]["blocks"], PRESETS["paper"]["blocks"]}

    def top(preset: str, n: int) -> pd.Series:
        cache = ScoringCache.load(dirs[PRESETS[preset]["blocks"]])
        frame = rank(cache, RankParams.preset(preset)).frame
        return truth.reindex(frame.nsmallest(n, "rank")["pair_id"].to_numpy())

    pool_rate = float((truth == "mismatch").mean())
    assert (top("default", 10) == "mismatch").sum() == 0
    assert (top("default", len(truth) // 10) == "mismatch").mean() <= pool_rate / 2
    assert (top("paper", 10) == "mismatch").sum() >= 3  # measured: 5 of 10 at k = 512


@pytest.mark.slow
def test_chips_demo_command_builds_where_the_dashboard_looks(built, tmp_path):
    """`chips demo [WS]`: reuses a complete demo (no new rows), defaults to the dashboard's location
    (CHIPS_DEMO_WS here), and refuses a user's workspace with one line."""
    env = {**os.environ, "PYTHONPATH": str(Path(demo.__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}

    def chips(*args: str, **extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "chips_core.cli", "demo", *args]
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=300)

    counts = "SELECT count(*), (SELECT max(run_id) FROM feature_runs) FROM pairs"
    with built.connect(read_only=True) as con:
        before = con.execute(counts).fetchone()
    for out in (chips(str(built.root)), chips(CHIPS_DEMO_WS=str(built.root))):
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"demo workspace ready at {built.root}"
    with built.connect(read_only=True) as con:
        assert con.execute(counts).fetchone() == before
    own = Workspace.init(tmp_path / "mine")
    out = chips(str(own.root))
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"chips demo: {own.root} is a CHIPS workspace but not the demo's; choose another folder for the demo"
    ]


def test_init_folder_claims_an_empty_demo_workspace(tmp_path):
    """What the dashboard does before it launches `chips demo` as a job there: a claimed, empty workspace
    (so the job has a `jobs` table), never a user's workspace."""
    ws = demo.init_folder(tmp_path / "demo")
    assert ws.db_path.is_file() and not demo.is_complete(ws.root)
    assert json.loads((ws.root / demo.MARKER).read_text()) == {
        "bundle_key": demo.bundle_key(),
        "complete": False,
    }
    assert demo.init_folder(ws.root).root == ws.root  # idempotent
    with pytest.raises(demo.DemoError, match="not the demo's"):
        demo.init_folder(Workspace.init(tmp_path / "mine").root)
