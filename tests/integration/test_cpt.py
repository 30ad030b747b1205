"""CPT through real `open_clip_train.main` subprocesses on a tiny random-init model and real images."""

import csv
import math
import os
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from chips_core.scoring.params import RankParams
from chips_core.training import cpt
from chips_core.training.cpt import Recipe
from chips_core.training.evaluate import evaluate_run
from chips_core.workspace.store import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "chips-tiny-vit"  # teammate B's tiny config (chips_core/features/model_configs), random init


def _make_csv(folder, n_rows, name="train.csv"):
    """`n_rows` pairs from 8 scikit-image pictures x rotations, with label-like captions."""
    sources = ["retina", "cell", "camera", "coins", "moon", "astronaut", "chelsea", "coffee"]
    img_dir = folder / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_rows):
        src, rot = sources[i % 8], (i // 8) % 4
        path = img_dir / f"{src}_{rot}.png"
        if not path.exists():
            Image.fromarray(getattr(skimage.data, src)()).convert("RGB").resize((64, 64)).rotate(
                90 * rot
            ).save(path)
        rows.append([str(path), f"a picture of {src}, rotated {90 * rot} degrees", src])
    out = folder / name
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def ws_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    return Workspace.init(root / "ws"), _make_csv(root, 32)


def _progress(ws, run_id):
    with ws.connect(read_only=True) as con:
        return con.execute(
            "SELECT step, epoch, loss, lr, samples_per_s FROM cpt_progress "
            "WHERE cpt_run_id = ? ORDER BY step",
            [run_id],
        ).fetchall()


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_records_progress_checkpoint_and_evaluates(ws_csv):
    ws, train_csv = ws_csv
    seen = []
    run_id = cpt.train(
        ws,
        train_csv,
        Recipe(MODEL, epochs=2, lr=1e-3, batch_size=8, warmup=2, workers=0),
        seed=0,
        progress=seen.append,
    )
    info = cpt.run_config(ws, run_id)
    assert info["status"] == "finished"
    rows = _progress(ws, run_id)
    assert [r[0] for r in rows] == list(range(8)) == [r["step"] for r in seen]
    assert [r[1] for r in rows] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    # the exact cosine schedule with 2 warm-up steps over 8 steps (open_clip_train.scheduler.cosine_lr)
    expect = [
        1e-3 * (s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) * 1e-3 for s in range(8)
    ]
    assert [r[3] for r in rows] == pytest.approx(expect)
    assert all(math.isfinite(r[2]) and r[2] > 0 and r[4] > 0 for r in rows)
    # the checkpoint, its sidecar, and the recorded paper defaults
    ck = cpt.checkpoints(ws, run_id)
    assert [p.name for p in ck] == ["epoch_1.pt", "epoch_2.pt"] and info["checkpoint"] == str(ck[-1])
    assert (ck[-1].parent / "epoch_2.pt.json").is_file()
    assert _state(ck[-1])["epoch"] == 2
    argv = info["config"]["argv"]
    for flag, value in (
        ("--beta1", "0.9"),
        ("--beta2", "0.98"),
        ("--eps", "1e-06"),
        ("--lr-scheduler", "cosine"),
    ):
        assert argv[argv.index(flag) + 1] == value
    # the trained weights moved away from the seeded random init they started from
    start = _state(ck[0])["state_dict"]["visual.proj"]
    assert not torch.equal(start, _state(ck[-1])["state_dict"]["visual.proj"])
    # every checkpoint loads with its own weights through chips_core.features.models (TracIn's
    # featurize passes)
    from chips_core.features.models import load_model

    for path in ck:
        loaded = load_model(*cpt.checkpoint_model(ws, run_id, path))
        assert torch.equal(loaded.model.visual.proj.detach(), _state(path)["state_dict"]["visual.proj"])
    metrics = evaluate_run(ws, run_id, train_csv, templates=("a picture of {label}.",))
    assert metrics["n_pairs"] == 32 and metrics["n_classes"] == 8
    assert 0.0 <= metrics["i2t_R@1"] <= metrics["i2t_R@5"] <= metrics["i2t_R@10"] <= 1.0
    with ws.connect(read_only=True) as con:
        n = con.execute("SELECT count(*) FROM eval_results WHERE cpt_run_id = ?", [run_id]).fetchone()[0]
    assert n == len(metrics)


def test_start_from_checkpoint_loads_its_weights(ws_csv):
    """lr = 0 leaves the weights untouched: the result equals the starting checkpoint, not a fresh init."""
    ws, train_csv = ws_csv
    with ws.connect(read_only=True) as con:
        start = con.execute("SELECT min(checkpoint) FROM cpt_runs WHERE status = 'finished'").fetchone()[0]
    assert start is not None, "runs after test_train_records_progress_checkpoint_and_evaluates"
    recipe = Recipe(MODEL, start, epochs=1, lr=0.0, batch_size=8, warmup=1, workers=0)
    second = cpt.train(ws, train_csv, recipe, seed=2)
    end = _state(cpt.run_config(ws, second)["checkpoint"])
    assert end["epoch"] == 1  # a fresh schedule and optimizer, not a resumed one
    before = _state(start)["state_dict"]
    assert before.keys() == end["state_dict"].keys()
    assert all(torch.equal(before[k], end["state_dict"][k]) for k in before)


def test_cancel_then_resume_finishes(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    train_csv = _make_csv(tmp_path, 64)  # batch 4 -> 16 steps per epoch, 3 epochs
    cancelled = []

    def stop_in_epoch_two(row):
        if row["epoch"] > 1.1 and not cancelled:
            with ws.connect(read_only=True) as con:
                run_id = con.execute("SELECT max(cpt_run_id) FROM cpt_runs").fetchone()[0]
            cancelled.append(cpt.cancel(ws, run_id, grace_s=5))

    recipe = Recipe(MODEL, epochs=3, lr=1e-3, batch_size=4, warmup=2, workers=0)
    run_id = cpt.train(ws, train_csv, recipe, progress=stop_in_epoch_two)
    assert cancelled == [True]
    assert cpt.status(ws, run_id) == "cancelled"
    assert [p.name for p in cpt.checkpoints(ws, run_id)] == ["epoch_1.pt"]
    pid = int((cpt.run_dir(ws, run_id) / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not cpt.cancel(ws, run_id)  # not running any more
    steps_before = {r[0] for r in _progress(ws, run_id)}
    assert 16 < max(steps_before) < 47

    cpt.resume(ws, run_id)
    info = cpt.run_config(ws, run_id)
    assert info["status"] == "finished" and info["checkpoint"].endswith("epoch_3.pt")
    log = (cpt.run_dir(ws, run_id) / "train.log").read_text()
    assert "resuming checkpoint" in log and "(epoch 1)" in log
    assert [r[0] for r in _progress(ws, run_id)] == list(range(48))
    with pytest.raises(cpt.CPTError, match="already finished"):
        cpt.resume(ws, run_id)


def test_bad_inputs_are_named(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    good = _make_csv(tmp_path, 8)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,title\nx.png,a caption\n")
    with pytest.raises(cpt.CPTError, match="bad.csv has no column 'filepath'"):
        cpt.train(ws, bad, Recipe(MODEL))
    missing = tmp_path / "missing.csv"
    missing.write_text(f"filepath,title\n{tmp_path / 'nope.png'},a caption\n")
    with pytest.raises(cpt.CPTError, match="row 2: image file not found"):
        cpt.train(ws, missing, Recipe(MODEL))
    with pytest.raises(cpt.CPTError, match="fewer than one batch"):
        cpt.train(ws, good, Recipe(MODEL, batch_size=16))
    with pytest.raises(cpt.CPTError, match="unknown open_clip model"):
        cpt.train(ws, good, Recipe("no-such-model", batch_size=4))
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM cpt_runs").fetchone()[0] == 0
    assert list((ws.root / "cpt").iterdir()) == []


def test_training_failure_is_recorded_with_log_tail(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    train_csv = _make_csv(tmp_path, 8)
    broken = tmp_path / "imgs" / "retina_0.png"
    broken.write_bytes(b"")  # exists (passes the up-front check) but PIL cannot open it
    with pytest.raises(cpt.CPTError, match="failed .exit code 1.*\n.*") as err:
        cpt.train(ws, train_csv, Recipe(MODEL, epochs=1, batch_size=4, workers=0))
    assert "UnidentifiedImageError" in str(err.value)
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT status FROM cpt_runs").fetchone()[0] == "failed"


def test_experiment_end_to_end_with_tracin(tmp_path):
    """ingest → featurize → prepare → (warm-up CPT → TracIn caches) → select, CPT, evaluate per cell."""
    from chips_core.engines.pipeline import prepare_workspace
    from chips_core.features.featurize import featurize
    from chips_core.pools.ingest import ingest
    from chips_core.scoring.params import PrepareConfig
    from chips_core.training import experiment as ex

    ws = Workspace.init(tmp_path / "ws")
    pool_csv = _make_csv(tmp_path, 32, "pool.csv")
    eval_csv = _make_csv(tmp_path / "val", 16, "val.csv")
    ingest(ws, "pool", pool_csv, label_col="label", workers=0)
    ingest(ws, "val", eval_csv, kind="eval", label_col="label", workers=0)
    for name in ("pool", "val"):
        featurize(ws, name, MODEL, device="cpu")
    cfg = PrepareConfig(k_max=16, batch_size=8, curvature_pairs=32, chunk_batches=2)
    cache_id = prepare_workspace(ws, "pool", "val", cfg)
    warm = cpt.train(ws, pool_csv, Recipe(MODEL, epochs=2, lr=1e-3, batch_size=8, warmup=1, workers=0))
    tracin = ex.tracin_checkpoints(ws, "pool", "val", warm, cfg)
    assert len(tracin) == 2 and all(eta > 0 for _, eta in tracin)
    assert tracin[0][0].root != tracin[1][0].root  # one featurize + prepare per checkpoint

    recipe = Recipe(MODEL, epochs=1, lr=1e-3, batch_size=4, warmup=1, workers=0)
    out = tmp_path / "exp"
    run = ex.run_experiment(
        ws, "pool", "val", ["random", "tracin"], [0.5], [0], recipe, cache=cache_id, tracin=tracin,
        include_full=False, out_dir=out,
    )  # fmt: skip
    assert sorted(run["method"]) == ["none", "random", "tracin"]
    trained = run[run["method"] != "none"]
    assert (trained["n_selected"] == 16).all() and trained["cpt_run_id"].notna().all()
    assert run["i2t_R@1"].between(0, 1).all()
    md = (out / "summary.md").read_text()
    assert "| tracin |" in md and "No CPT" in md and (out / "plot.png").is_file()
    with ws.connect(read_only=True) as con:
        n_runs = con.execute("SELECT count(*) FROM cpt_runs").fetchone()[0]
    again = ex.run_experiment(
        ws, "pool", "val", ["random", "tracin"], [0.5], [0], recipe, cache=cache_id, tracin=tracin,
        include_full=False, out_dir=out,
    )  # fmt: skip
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM cpt_runs").fetchone()[0] == n_runs  # finished cells skipped
    assert len(again) == 3
    with pytest.raises(ValueError, match="agreement: 0.75 → 0.0"):  # resuming with other rank parameters
        ex.run_experiment(
            ws, "pool", "val", ["random"], [0.5], [0], recipe, cache=cache_id,
            rank_params=RankParams(agreement=0.0), include_full=False, out_dir=out,
        )  # fmt: skip


def test_cli_train_and_evaluate(ws_csv, capsys):
    from chips_core.cli import main

    ws, train_csv = ws_csv
    flags = ["--model", MODEL, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--lr", "1e-4"]
    assert main(["train", str(ws.root), "--csv", str(train_csv), *flags]) == 0
    out = capsys.readouterr().out
    run_id = int(out.split("CPT run ")[1].split()[0])
    assert "finished" in out and cpt.run_config(ws, run_id)["config"]["lr"] == 1e-4
    assert (
        main(["evaluate", str(ws.root), str(train_csv), "--run", str(run_id), "--template", "{label}"]) == 0
    )
    assert '"n_pairs": 32.0' in capsys.readouterr().out
    # before vs after: the run's starting weights through the same evaluation, once
    evaluate_flags = [str(train_csv), "--run", str(run_id), "--template", "{label}", "--with-base"]
    for _ in range(2):
        assert main(["evaluate", str(ws.root), *evaluate_flags]) == 0
    from chips_core.training.evaluate import BASE, compare_run

    cmp = compare_run(ws, run_id)
    assert len(cmp) and cmp[["base", "trained"]].notna().all().all()
    assert (cmp["change"] == cmp["trained"] - cmp["base"]).all()
    with ws.connect(read_only=True) as con:
        n_base = con.execute(
            "SELECT count(*) FROM eval_results WHERE cpt_run_id = ? AND starts_with(checkpoint, ?)",
            [run_id, BASE],
        ).fetchone()[0]
    assert n_base == len(cmp) + 2  # the metrics, n_pairs and n_classes, stored once
    assert main(["cpt-cancel", str(ws.root), str(run_id)]) == 1  # not running


def test_a_train_job_reports_progress_while_running_and_cancels_as_cancelled(tmp_path):
    """`chips train` as a background job (the dashboard's way): cpt_progress rows and the job's progress
    while the training process is alive; cancelling the job records the CPT run 'cancelled', not 'failed'."""
    import time

    from chips_core.workspace import catalog, jobs

    ws = Workspace.init(tmp_path / "ws")
    train_csv = _make_csv(tmp_path, 64)
    argv = ["train", str(ws.root), "--csv", str(train_csv), "--model", MODEL, "--epochs", "50"]
    job_id = jobs.launch(ws, "train", [*argv, "--batch-size", "4", "--workers", "0", "--lr", "1e-4"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = catalog.cpt_runs_overview(ws)
        if len(runs) and len(catalog.cpt_progress(ws, int(runs.cpt_run_id[0]))) >= 3:
            break
        assert jobs.job_status(ws, job_id).active, jobs.read_log(ws, job_id)
        time.sleep(0.5)
    run_id = int(runs.cpt_run_id[0])
    live = cpt.live_progress(ws, run_id)
    assert live.status == "running" and live.total == 16 * 50 and 3 <= live.done < live.total
    assert live.loss is not None and live.eta_s is not None and live.eta_s > 0
    pid = int((cpt.run_dir(ws, run_id) / "pid").read_text())
    assert cpt._alive(pid)  # the rows came while open_clip_train runs
    time.sleep(1.5)  # the job reporter writes at most every 0.5 s
    assert jobs.job_status(ws, job_id).progress > 0
    info = jobs.cancel(ws, job_id, grace_s=20)
    assert info.status == "cancelled"
    assert cpt.status(ws, run_id) == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_a_train_job_row_moves_between_0_and_1_while_training_then_ends_at_1(tmp_path: Path) -> None:
    """Issue 12 ("the jobs table stayed at 0% while the log was at epoch 5"): while a `chips train` job's
    open_clip_train runs, its job row holds a fraction strictly between 0 and 1 that grows, equal to the
    steps its message names over the run's total (64 pairs / batch 4 × 3 epochs); then done at 1."""
    import re
    import time

    from chips_core.workspace import jobs

    ws = Workspace.init(tmp_path / "ws")
    train_csv = _make_csv(tmp_path, 64)
    epochs, total = 3, 64 // 4 * 3
    argv = ["train", str(ws.root), "--csv", str(train_csv), "--model", MODEL, "--epochs", str(epochs)]
    job_id = jobs.launch(ws, "train", [*argv, "--batch-size", "4", "--workers", "0", "--lr", "1e-4"])
    seen: list[tuple[float, str]] = []  # (progress, message) of the job row while the job was active
    deadline = time.monotonic() + 300
    while (info := jobs.job_status(ws, job_id)).active and time.monotonic() < deadline:
        if info.progress is not None:
            seen.append((info.progress, info.message))
        time.sleep(0.1)
    assert info.status == "done" and info.progress == 1.0, jobs.read_log(ws, job_id)
    running = [(p, m) for p, m in seen if 0 < p < 1]
    assert len({p for p, _ in running}) >= 2, seen  # it moved while the job ran, not only at its end
    assert [p for p, _ in running] == sorted(p for p, _ in running)
    for fraction, message in running:
        done, of = map(int, re.fullmatch(r"cpt: (\d+)/(\d+)", message).groups())
        assert of == total and fraction == pytest.approx(done / total)
    [run_id] = {int(r) for r in re.findall(r"CPT run (\d+) finished", jobs.read_log(ws, job_id))}
    assert cpt.status(ws, run_id) == "finished"
