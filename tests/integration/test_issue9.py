"""Issue 9 (the CLI half): a tiny pool, refused random weights, resumable featurize, early parameter errors,
unknown eval sets and tags, the feature run a score uses, one selection convention and the README's quick
start run verbatim. Real workspaces, real tiny open_clip models, the real `chips` command; no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chips_core import cli
from chips_core.workspace.store import Workspace
from tests.fixtures_build import write_manifest as manifest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MODEL = "chips-tiny-vit"


def run(capsys, *args) -> tuple[int, str, str]:
    """`chips ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def chips_subprocess(*args, extra: tuple[str, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("CHIPS_DEBUG", None)
    return subprocess.run(
        [sys.executable, *extra, "-m", "chips_core.cli", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A workspace with a 10-pair pool and a 10-pair eval set, both featurized with a tiny model."""
    root = tmp_path_factory.mktemp("issue9")
    ws = root / "ws"
    assert cli.main(["init", str(ws)]) == 0
    assert cli.main(["ingest", str(ws), "pool", str(manifest(root / "pool", 10, 1)), "--workers", "0"]) == 0
    target = manifest(root / "eval", 10, 2)
    assert cli.main(["ingest", str(ws), "target", str(target), "--eval", "--workers", "0"]) == 0
    for name in ("pool", "target"):
        assert cli.main(["featurize", str(ws), name, "--model", MODEL, "--device", "cpu"]) == 0
    return ws


# --- 1. a 10-pair pool ---------------------------------------------------------------------------------


def test_tiny_pool_caps_k_max_and_scores(tiny, capsys):
    code, out, err = run(capsys, "score", tiny, "pool", "--eval", "target", "--device", "cpu")
    assert code == 0, err
    assert "k_max capped from 1024 to 99" in err and "rank at most 99" in err
    assert "  k             49" in out  # k_max/2 of the capped sketch
    with Workspace(tiny).connect(read_only=True) as con:
        config = con.execute("SELECT config FROM scoring_caches ORDER BY cache_id DESC LIMIT 1").fetchone()[0]
    assert '"k_max": 99' in config


def test_low_stability_warns(tiny, capsys):
    code, out, err = run(capsys, "score", tiny, "pool", "--eval", "target", "--device", "cpu", "--k-max", 64)
    assert code == 0, err
    stability = float(next(line for line in out.splitlines() if "stability" in line).split()[-1])
    assert stability < 0.5  # seeded: 0.248 on this pool
    assert f"warning: ranking stability {stability:.3f} is below 0.5" in err


# --- 2. a model with published weights and no --pretrained; 6. a bad tag ---------------------------------


def test_random_weights_need_random_init(tiny, capsys):
    code, out, err = run(capsys, "featurize", tiny, "pool", "--model", "ViT-B-32", "--device", "cpu")
    assert code == 1
    assert "model 'ViT-B-32' has pretrained weights (" in err and "openai" in err and "--random-init" in err
    assert "initialized randomly" not in err
    with Workspace(tiny).connect(read_only=True) as con:  # refused before anything was recorded
        assert con.execute("SELECT count(*) FROM models WHERE name = 'ViT-B-32'").fetchone()[0] == 0
    code, _, err = run(
        capsys, "featurize", tiny, "pool", "--model", "ViT-B-32", "--random-init", "--pretrained", "openai"
    )
    assert code == 1 and "exclude each other" in err


def test_no_random_init_warning_when_a_checkpoint_is_loaded(tmp_path, caplog):
    import torch

    from chips_core.features.models import load_model

    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": load_model(MODEL, seed=3).model.state_dict()}, ckpt)
    caplog.clear()
    loaded = load_model(MODEL, str(ckpt))
    assert loaded.identity.checkpoint == str(ckpt)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_bad_pretrained_tag_lists_the_valid_tags(tiny, capfd):
    capfd.readouterr()
    code = cli.main(["featurize", str(tiny), "pool", "--model", "ViT-B-32", "--pretrained", "nosuchtag"])
    err = capfd.readouterr().err
    assert code == 1
    assert "unknown pretrained tag 'nosuchtag' for model 'ViT-B-32'; valid tags: openai, laion400m_e31" in err
    assert "ERROR:root" not in err and "local cache" not in err


# --- 3. kill -9 during featurize: resume from the last checkpoint; status says "interrupted" --------------


def _status_of_runs(ws: Path, pool: str) -> list[str]:
    import json

    proc = chips_subprocess("status", ws, "--json")
    assert proc.returncode == 0, proc.stderr
    return [r["status"] for r in json.loads(proc.stdout)["feature runs"] if r["pool"] == pool]


@pytest.mark.slow
def test_killed_featurize_resumes_from_its_last_checkpoint(tiny, tmp_path):
    import signal
    import time

    import numpy as np

    from chips_core.features import featurize as features
    from chips_core.features.models import load_model

    n = 400
    assert cli.main(["ingest", str(tiny), "big", str(manifest(tmp_path, n, 3)), "--workers", "0"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    args = ["featurize", tiny, "big", "--model", MODEL, "--device", "cpu", "--batch-size", 4]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chips_core.cli", *map(str, args), "--checkpoint-s", "0.05"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run_dir = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(tiny.glob("features/*/part-00000-0001.json"))  # two checkpoints written
        if found:
            run_dir = found[0].parent
            break
        time.sleep(0.02)
    assert run_dir is not None, f"no checkpoint before the run ended: {proc.communicate()[1]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Workspace(tiny).connect(read_only=True) as con:
        sql = (
            "SELECT count(*) FROM feature_shards JOIN feature_runs USING (run_id) JOIN pools USING (pool_id)"
        )
        assert con.execute(sql + " WHERE name = 'big'").fetchone()[0] == 0  # killed inside its only shard
    assert _status_of_runs(tiny, "big") == ["interrupted"]

    reports = []
    loaded = load_model(MODEL)
    run_id = features.featurize(
        Workspace(tiny), "big", loaded, device="cpu", batch_size=4, progress=reports.append
    )
    resumed = reports[0].done
    assert 8 <= resumed < n  # at least the two checkpoints (4 pairs each) were kept, not redone
    assert not list(run_dir.glob("part-*"))
    store = features.FeatureStore(Workspace(tiny), run_id)
    frozen = features.read_rows(run_dir / "pairs.parquet", 0, n)
    assert store.pair_ids().tolist() == frozen[0].tolist()  # every pair once, in store order
    idx = np.array([0, resumed - 1, resumed, n - 1])
    import torch

    from chips_core.pools.records import load_image

    images = torch.stack([loaded.preprocess(load_image(frozen[1][i])) for i in idx])
    h, t = loaded.encode(images, loaded.tokenizer([frozen[2][i] for i in idx]))
    got_h, got_t = store.rows(idx)
    np.testing.assert_allclose(got_h.astype(np.float32), h.half().float().numpy(), atol=2e-3)
    np.testing.assert_allclose(got_t.astype(np.float32), t.half().float().numpy(), atol=2e-3)
    assert _status_of_runs(tiny, "big") == ["done"]


# --- 4. parameter errors before the heavy imports ---------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--alpha", "2", "argument --alpha: 2 is not a number in [0, 1]"),
        ("--k", "0", "argument --k: 0 is not an integer ≥ 1"),
        ("--ratio", "0", "argument --ratio: 0 is not a number in (0, 1]"),
    ],
)
def test_parameter_errors_come_before_torch_is_imported(tiny, flag, value, message):
    proc = chips_subprocess(
        "score", tiny, "pool", "--eval", "target", flag, value, extra=("-X", "importtime")
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line
    }
    assert "chips_core.engines.pipeline" in imported  # the importtime lines were read
    assert not {"torch", "open_clip", "scipy"} & imported


# --- 5. an eval set that does not exist -------------------------------------------------------------------


def test_unknown_eval_set_is_named_with_the_ones_that_exist(tiny, capsys):
    code, _, err = run(capsys, "score", tiny, "pool", "--eval", "ghost", "--device", "cpu")
    assert code == 1
    assert "no eval set named 'ghost'" in err and "(eval sets: target)" in err
    assert "featurize" not in err
    code, _, err = run(capsys, "prepare", tiny, "nopool", "--eval", "target", "--device", "cpu")
    assert code == 1 and "no pool named 'nopool'" in err and "pools: " in err and "pool" in err


# --- 7. a pool featurized with several models -------------------------------------------------------------


def test_score_uses_the_named_or_first_model_and_says_which(tiny, tmp_path, capsys):
    import shutil

    import torch

    from chips_core.features.models import load_model

    ws = tmp_path / "ws"
    shutil.copytree(tiny, ws)
    ckpt = tmp_path / "epoch_1.pt"  # like a CPT checkpoint featurized later for TracIn
    torch.save({"state_dict": load_model(MODEL, seed=5).model.state_dict()}, ckpt)
    for name in ("pool", "target"):
        assert (
            run(capsys, "featurize", ws, name, "--model", MODEL, "--pretrained", ckpt, "--device", "cpu")[0]
            == 0
        )
    with Workspace(ws).connect(read_only=True) as con:
        runs = con.execute(
            "SELECT p.name, r.run_id, m.checkpoint FROM feature_runs r JOIN pools p USING (pool_id) "
            "JOIN models m USING (model_id) WHERE p.name = 'pool' ORDER BY r.run_id"
        ).fetchall()
    first, newest = [r[1] for r in runs if r[2] is None][0], [r[1] for r in runs if r[2] is not None][0]
    assert newest > first

    def cache_pool_run() -> int:
        with Workspace(ws).connect(read_only=True) as con:
            sql = "SELECT pool_run_id FROM scoring_caches ORDER BY cache_id DESC LIMIT 1"
            return con.execute(sql).fetchone()[0]

    prep = ("--device", "cpu", "--k-max", 32)
    code, _, err = run(capsys, "score", ws, "pool", "--eval", "target", *prep)
    assert code == 0, err
    assert cache_pool_run() == first and f"using feature run {first} of pool" in err
    code, _, err = run(capsys, "score", ws, "pool", "--eval", "target", "--model", ckpt, *prep)
    assert code == 0, err
    assert cache_pool_run() == newest and f"using feature run {newest} of pool" in err
    code, _, err = run(capsys, "score", ws, "pool", "--eval", "target", "--model", MODEL, *prep)
    assert code == 1
    assert (
        "matches feature runs of several models" in err and f"run {first}:" in err and f"run {newest}:" in err
    )


# --- 8. the README's quick start, verbatim ----------------------------------------------------------------


def _quick_start() -> str:
    """The README's first bash block under '## Your own pool from the command line', as written."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own pool from the command line", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path):
    """Runs the quick start line by line with bash. Substituted, and only these: the venv line's
    `bash scripts/env.sh` (this test's interpreter stands in for the venv's `chips` command), the data
    paths /data/pool.csv and /data/val.csv (small real-image pools), and the model
    `--model ViT-B-16 --pretrained openai` (no network here: a tiny config with a local checkpoint)."""
    import torch

    from chips_core.features.models import load_model

    script = _quick_start()
    pool = manifest(tmp_path / "pool", 220, 4)  # ratio 0.3 keeps 66 ≥ train's default batch of 64
    val = manifest(tmp_path / "val", 12, 5)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": load_model(MODEL, seed=1).model.state_dict()}, ckpt)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shim = venv / "bin" / "chips"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m chips_core.cli "$@"\n')
    shim.chmod(0o755)
    subs = {
        "bash scripts/env.sh | tail -n 1": f"echo {venv}",
        "/data/pool.csv": str(pool),
        "/data/val.csv": str(val),
        "--model ViT-B-16 --pretrained openai": f"--model {MODEL} --pretrained {ckpt}",
    }
    for old, new in subs.items():
        assert old in script, f"the README's quick start no longer has {old!r}: update this test"
        script = script.replace(old, new)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("CHIPS_DEBUG", None)
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, f"quick start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (work / "subset" / "train.csv").is_file() and (work / "scores.parquet").is_file()
    assert "selection top30 v1" in proc.stdout and "CPT run" in proc.stdout
    assert '"n_pairs"' in proc.stdout or "recall" in proc.stdout  # evaluate printed its metrics
