"""CPT progress while a run trains: open_clip_train's log line, rows stored while the process lives, the
live summary (step/total, loss, ETA), and the before-vs-after table of an evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chips_core.training import cpt, evaluate
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

# captured from a real `open_clip_train.main` run (open_clip_torch 3.3.0, chips-tiny-vit, batch 4, 64 rows)
REAL_LINE = (
    "2026-11-30,16:42:31 | INFO | Train Epoch: 0 [ 8/64 (12%)] Data (t): 0.012 Batch (t): 0.266, "
    "15.0238/s, 15.0238/s/gpu LR: 0.000400 Logit Scale: 14.283 Contrastive_loss: 1.3167 (1.4466) "
    "Loss: 1.3167 (1.4466)\n"
)


def test_parse_a_real_open_clip_train_line():
    row = cpt.parse_progress(REAL_LINE, steps_per_epoch=16, batch_size=4, world=1, accum=1)
    assert row == {"step": 1, "epoch": 0.125, "loss": 1.3167, "lr": 0.0004, "samples_per_s": 15.0238}
    assert cpt.parse_progress("2026-11-30 | INFO | Start epoch 0\n", 16, 4, 1, 1) is None


def _fake_run(ws: Workspace, tmp_path, n_lines: int, gap_s: float, then_sleep_s: float) -> int:
    """A recorded CPT run whose command prints `n_lines` real-format log lines, then stays alive."""
    lines = [REAL_LINE.replace("[ 8/64", f"[{4 * (i + 1):2d}/64") for i in range(n_lines)]
    script = (
        "import sys, time\n"
        f"for line in {lines!r}:\n"
        f"    sys.stderr.write(line); sys.stderr.flush(); time.sleep({gap_s})\n"
        f"time.sleep({then_sleep_s})\n"
    )
    oc = ["--train-data", "x.csv", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--warmup", "1"]
    with ws.connect() as con:
        run_id = ws.next_id(con)
        catalog.insert_cpt_run(con, run_id, None, "preparing", str(cpt.run_dir(ws, run_id)))
    cpt.run_dir(ws, run_id).mkdir(parents=True)
    config = {
        "argv": [sys.executable, "-c", script, "open_clip_train.main", *oc], "cwd": str(tmp_path),
        "steps_per_epoch": 16, "total_steps": 16, "nproc_per_node": 1, "accum_freq": 1, "epochs": 1,
        "model": "chips-tiny-vit", "device": "cpu",
    }  # fmt: skip
    catalog.set_cpt_config(ws, run_id, json.dumps(config), cpt.ACTIVE)
    return run_id


def test_rows_are_stored_while_the_process_is_alive(tmp_path):
    """Lines that come quickly and then a quiet log (an epoch's last steps, a checkpoint being written):
    their rows must be stored within about a second, not when the next line or the end comes."""
    ws = Workspace.init(tmp_path / "ws")
    run_id = _fake_run(ws, tmp_path, n_lines=3, gap_s=0.2, then_sleep_s=20)
    # the supervisor in its own process, as in a `chips train` job (DuckDB: one writing process)
    code = (
        "import sys; from chips_core.training import cpt; from chips_core.workspace.store import Workspace\n"
        "ws = Workspace(sys.argv[1]); run = int(sys.argv[2])\n"
        "cpt._supervise(ws, run, cpt.run_config(ws, run)['config'], None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sup = subprocess.Popen([sys.executable, "-c", code, str(ws.root), str(run_id)], env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(catalog.cpt_progress(ws, run_id)) < 3 and sup.poll() is None:
        time.sleep(0.2)
    pid = int((cpt.run_dir(ws, run_id) / "pid").read_text())
    assert cpt._alive(pid), "the training process is still running"
    rows = catalog.cpt_progress(ws, run_id)
    assert rows["step"].tolist() == [0, 1, 2]
    live = cpt.live_progress(ws, run_id)
    assert (live.status, live.done, live.total, live.epochs) == ("running", 3, 16, 1)
    assert live.loss == pytest.approx(1.3167) and live.fraction == pytest.approx(3 / 16)
    # ~0.2 s per logged step, 13 steps left
    assert live.eta_s is not None and 0.5 < live.eta_s < 30
    assert cpt.cancel(ws, run_id, grace_s=5)
    assert sup.wait(timeout=60) == 0  # a cancelled run is no error
    assert cpt.status(ws, run_id) == "cancelled"
    assert cpt.live_progress(ws, run_id).eta_s is None  # no ETA once it ended


def test_compare_run_base_vs_trained(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        run_id = ws.next_id(con)
        catalog.insert_cpt_run(con, run_id, None, "finished", str(tmp_path))
    assert evaluate.compare_run(ws, run_id).empty
    trained = {"n_pairs": 16.0, "i2t_R@1": 0.5, "t2i_R@1": 0.25}
    catalog.insert_eval_results(ws, "/ck/epoch_1.pt", -1, run_id, trained)
    only_trained = evaluate.compare_run(ws, run_id)
    assert only_trained["base"].isna().all() and only_trained["change"].isna().all()
    catalog.insert_eval_results(
        ws, evaluate.BASE + "chips-tiny-vit", -1, run_id, {"i2t_R@1": 0.25, "t2i_R@1": 0.5}
    )
    cmp = evaluate.compare_run(ws, run_id)
    assert cmp.columns.tolist() == ["eval_set", "metric", "base", "trained", "change"]
    assert cmp["metric"].tolist() == ["i2t_R@1", "t2i_R@1"]  # sizes (n_pairs) are not compared
    assert cmp["base"].tolist() == [0.25, 0.5] and cmp["trained"].tolist() == [0.5, 0.25]
    assert cmp["change"].tolist() == pytest.approx([0.25, -0.25])
    assert set(cmp["eval_set"]) == {"(eval CSV)"}
