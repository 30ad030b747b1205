"""Continual pre-training (CPT) of an open_clip model on a selection, through `open_clip_train.main`.

Training is never re-implemented here: `train` writes the run's configuration, starts
`python -m open_clip_train.main` (or `torch.distributed.run` on several GPUs) as a subprocess in its own
process group, and turns its log lines into `cpt_progress` rows while it runs. `cancel` terminates that
process group from any process; `resume` restarts the same command with open_clip_train's public
`--resume latest`, which reloads the newest epoch checkpoint with its optimizer state.

Starting weights: a pretrained tag goes to `--pretrained TAG`; a local checkpoint file (or none, random
init) goes through open_clip's `local-dir:` model schema: the run folder gets `model/open_clip_config.json`
(the model config) and the checkpoint linked as `model/open_clip_pytorch_model.bin`. open_clip then
loads only the weights (strict), with a fresh optimizer and schedule starting at step 0, which is what CPT
needs; `--resume` would instead restore the old epoch counter and optimizer. The local-dir form also lets
the subprocess use model configs registered only in this process (tests, chips_core/features/model_configs).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from chips_core.errors import ChipsError
from chips_core.team import audit, roles
from chips_core.team.identity import Actor, current_actor
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, atomic_write_bytes

OC_NAME = "oc"  # open_clip_train --name inside the run folder
ACTIVE = "running"
# CPT optimizer (CHIPS paper, METHOD.md section 8): AdamW (0.9, 0.98), eps 1e-6, cosine schedule; the
# recipe's own defaults (lr 1e-6, 5 epochs, batch 64, ...) are Recipe's (below)
ADAM_BETAS = (0.9, 0.98)
ADAM_EPS = 1e-6
FLUSH_S = 1.0  # progress rows are stored at least this often while a run trains


@dataclass(frozen=True)
class Recipe:
    """The CPT recipe: cpt.train's one parameter object, shared by every cell of an experiment. Its
    defaults (the CHIPS paper's, METHOD.md §8) are the CLI's and the dashboard's."""

    model: str  # open_clip name, local-dir:PATH or hf-hub:ID
    pretrained: str | None = None  # pretrained tag or a local checkpoint file
    epochs: int = 5
    lr: float = 1e-6
    batch_size: int = 64
    warmup: int | None = None  # warm-up steps; None: 10% of the steps
    precision: str | None = None  # None: amp on CUDA, fp32 elsewhere
    workers: int = 2  # data loader workers
    device: str = "cpu"
    extra_args: tuple[str, ...] = ()  # more open_clip_train flags

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not str(self.model).strip():
            raise ValueError("model must name a model (open_clip name, local-dir:PATH or hf-hub:ID)")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError(
                f"epochs ≥ 1, batch_size ≥ 1 and workers ≥ 0 are required, got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, workers={self.workers}"
            )
        if not self.lr >= 0:  # 0 leaves the weights as they are (a check of the starting weights)
            raise ValueError(f"lr must not be negative, got {self.lr}")

    def replace(self, **changes: Any) -> Recipe:
        return replace(self, **changes)


_LINE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<seen>\d+)/(?P<total>\d+) .*?"
    r"(?P<sps>[\d.eE+-]+)/s, .*?LR: (?P<lr>[\d.eE+-]+) .*? Loss: (?P<loss>[\d.eE+-]+|nan|inf) \("
)
_START_EPOCH = re.compile(r"Start epoch (\d+)")

ProgressFn = Callable[[dict], None]


class CPTError(ChipsError):
    """A CPT problem with a message meant for the user (bad input or a failed training process)."""


def _now() -> datetime:
    return datetime.now()


def run_dir(ws: Workspace, cpt_run_id: int) -> Path:
    """The folder of one run: model/, train.csv, train.log, pid and open_clip's `oc/` log folder."""
    return ws.root / "cpt" / str(cpt_run_id)


def checkpoints(ws: Workspace, cpt_run_id: int) -> list[Path]:
    """The run's epoch checkpoints in epoch order (epoch_1.pt, epoch_2.pt, ...); TracIn uses them."""
    ck = run_dir(ws, cpt_run_id) / OC_NAME / "checkpoints"
    found = [p for p in ck.glob("epoch_*.pt") if p.stem.split("_")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("_")[1]))


def read_train_csv(path: Path, sep: str, img_key: str, caption_key: str) -> pd.DataFrame:
    """Read and check an open_clip CSV: columns present, no empty caption, every image file exists."""
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CPTError(f"cannot read training CSV {path}: {exc}") from exc
    for col, flag in ((img_key, "csv_img_key"), (caption_key, "csv_caption_key")):
        if col not in df.columns:
            raise CPTError(f"training CSV {path} has no column {col!r} ({flag}); columns: {list(df.columns)}")
    for i, (img, cap) in enumerate(zip(df[img_key], df[caption_key], strict=True)):
        if not cap.strip():
            raise CPTError(f"training CSV {path} row {i + 2}: empty caption")
        if not Path(img).is_file():
            raise CPTError(f"training CSV {path} row {i + 2}: image file not found: {img!r}")
    return df


def _export(ws: Workspace, selection_id: int, out: Path) -> tuple[Path, str, str, str]:
    """Export a saved selection as open_clip CSV into the run folder (teammate F's exporter)."""
    from chips_core.curation.export import export_selection

    info = export_selection(ws, selection_id, "csv", out)
    args = info.csv_args
    return info.path, args["separator"], args["img_key"], args["caption_key"]


def _write_bundle(folder: Path, doc: dict, weights: Path | None) -> None:
    """An open_clip `local-dir:` bundle: open_clip_config.json, the weights linked under a name it finds."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "open_clip_config.json", json.dumps(doc, indent=2).encode())
    for old in folder.glob("open_clip_*model.*"):
        old.unlink()
    if weights is not None:
        src = Path(weights).resolve()
        name = (
            "open_clip_model.safetensors" if src.suffix == ".safetensors" else "open_clip_pytorch_model.bin"
        )
        (folder / name).symlink_to(src)


def _model_args(model: str, pretrained: str | None, model_dir: Path) -> tuple[list[str], dict]:
    """open_clip_train flags that select the model and its starting weights (see module docstring)."""
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir

    from chips_core.features.models import register_model_configs

    register_model_configs()
    if model.startswith(("hf-hub:", "local-dir:")) and pretrained:
        raise CPTError(f"model {model!r} carries its own weights; drop pretrained={pretrained!r}")
    if model.startswith("hf-hub:"):
        return ["--model", model], {"model_arg": model}
    if pretrained and not Path(pretrained).is_file():
        if pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in pretrained:
            raise CPTError(f"pretrained checkpoint file not found: {pretrained}")
        return ["--model", model, "--pretrained", pretrained], {"model_arg": model}
    if model.startswith("local-dir:"):  # re-bundled so that every later checkpoint can be bundled alike
        src = Path(model.removeprefix("local-dir:"))
        try:
            doc = json.loads((src / "open_clip_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CPTError(f"{model}: cannot read open_clip_config.json: {exc}") from exc
        found = _find_checkpoint_in_dir(src)
        weights = Path(found) if found else None
    else:
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise CPTError(f"unknown open_clip model {model!r}: not built in and no config registered")
        doc, weights = {"model_cfg": cfg}, Path(pretrained) if pretrained else None
    _write_bundle(model_dir, doc, weights)
    arg = f"local-dir:{model_dir}"
    return ["--model", arg], {"model_arg": arg, "bundle_config": doc}


def checkpoint_model(
    ws: Workspace, cpt_run_id: int, checkpoint: str | os.PathLike | None = None
) -> tuple[str, str | None]:
    """(model, pretrained) that chips_core.features.models.load_model takes for a checkpoint of this run.

    Default: the run's final checkpoint. Runs launched through a `local-dir:` bundle get a bundle per
    checkpoint (`bundle-epoch_N/`: the same config with that checkpoint linked); others give (name, path).
    TracIn featurizes the pool once per checkpoint with exactly this.
    """
    info = run_config(ws, cpt_run_id)
    ck = Path(checkpoint or info["checkpoint"] or "")
    if not ck.is_file():
        raise CPTError(f"CPT run {cpt_run_id}: checkpoint {str(ck)!r} not found (status {info['status']})")
    cfg = info["config"]
    if "bundle_config" not in cfg:
        return cfg["model"], str(ck)
    folder = run_dir(ws, cpt_run_id) / f"bundle-{ck.stem}"
    _write_bundle(folder, cfg["bundle_config"], ck)
    return f"local-dir:{folder}", None


def _lr_fn(oc_args, steps_per_epoch: int) -> Callable[[int], float] | None:
    """The exact lr at a step from open_clip_train's own scheduler (its log prints only 6 decimals)."""
    import torch
    from open_clip_train import scheduler as sch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=oc_args.lr)
    total = steps_per_epoch * oc_args.epochs
    if oc_args.lr_scheduler == "cosine":
        return sch.cosine_lr(opt, oc_args.lr, oc_args.warmup, total)
    if oc_args.lr_scheduler == "const":
        return sch.const_lr(opt, oc_args.lr, oc_args.warmup, total)
    return None


def _steps_per_epoch(n_rows: int, batch_size: int, world: int, accum: int) -> int:
    """Optimizer steps per epoch as open_clip_train's CSV loader makes them (drop_last, sampler split)."""
    per_rank = math.ceil(n_rows / world) if world > 1 else n_rows
    return (per_rank // batch_size) // accum


def parse_progress(line: str, steps_per_epoch: int, batch_size: int, world: int, accum: int) -> dict | None:
    """One open_clip_train 'Train Epoch' log line → {step, epoch, loss, lr, samples_per_s}; else None."""
    m = _LINE.search(line)
    if m is None:
        return None
    epoch = int(m["epoch"])
    batch_count = int(m["seen"]) // (batch_size * accum * world)
    return {
        "step": steps_per_epoch * epoch + batch_count - 1,
        "epoch": epoch + batch_count / max(steps_per_epoch, 1),
        "loss": float(m["loss"]),
        "lr": float(m["lr"]),
        "samples_per_s": float(m["sps"]),
    }


def train(
    ws: Workspace,
    source: int | str | os.PathLike,
    recipe: Recipe,
    *,
    seed: int = 0,
    progress: ProgressFn | None = None,
    csv_separator: str | None = None,
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    save_frequency: int = 1,
    nproc_per_node: int | None = None,
    actor: Actor | None = None,
) -> int:
    """Continually pre-train `recipe.model` on a saved selection (its id) or an open_clip CSV with the
    CPT `recipe` (Recipe); return cpt_run_id.

    Blocks until the subprocess ends. Progress rows go to `cpt_progress` (and to `progress(row)`); the
    run ends 'finished' (checkpoint recorded), 'failed' (CPTError with the log tail) or 'cancelled'.
    `recipe.warmup` defaults to 10% of the steps; `recipe.precision` to 'amp' on CUDA, 'fp32' elsewhere.
    `actor` (default: the user a background job runs for, else the local user) must be a lead; the launch
    is written to the audit trail with the selection's score run and the recipe.
    """
    from open_clip_train.params import parse_args

    model, pretrained, epochs, lr = recipe.model, recipe.pretrained, recipe.epochs, recipe.lr
    batch_size, precision, warmup = recipe.batch_size, recipe.precision, recipe.warmup
    workers, device, extra_args = recipe.workers, recipe.device, list(recipe.extra_args)

    ws.check()
    actor = current_actor(actor)
    roles.require(ws, actor, "train", detail=f"train {recipe.model} on {source}")
    selection_id = source if isinstance(source, int) and not isinstance(source, bool) else None
    if selection_id is None:  # check a given CSV before anything is recorded
        csv_path = Path(source).resolve()
        if not csv_path.is_file():
            raise CPTError(f"training CSV not found: {csv_path}")
        sep = csv_separator or ("\t" if csv_path.suffix.lower() in (".tsv", ".tab") else ",")
        df = read_train_csv(csv_path, sep, csv_img_key, csv_caption_key)
    with ws.connect() as con:  # id and row in one transaction: a nextval alone is not persisted
        run_id = ws.next_id(con)
        rdir = run_dir(ws, run_id)
        catalog.insert_cpt_run(con, run_id, selection_id, "preparing", str(rdir))
    _audit_launch(ws, actor, run_id, selection_id, source, recipe, seed)
    rdir.mkdir(parents=True, exist_ok=False)
    try:  # nothing of a run that never started stays behind
        if selection_id is not None:
            csv_path, sep, csv_img_key, csv_caption_key = _export(ws, selection_id, rdir / "train.csv")
            df = read_train_csv(csv_path, sep, csv_img_key, csv_caption_key)

        if nproc_per_node is None:
            import torch

            nproc_per_node = torch.cuda.device_count() if device == "cuda" else 1
        world = max(1, nproc_per_node)
        precision = precision or ("amp" if device.startswith("cuda") else "fp32")
        model_flags, model_info = _model_args(model, pretrained, rdir / "model")
        # fmt: off
        oc = [
            "--train-data", str(csv_path), "--dataset-type", "csv", "--csv-separator", sep,
            "--csv-img-key", csv_img_key, "--csv-caption-key", csv_caption_key,
            *model_flags, "--logs", str(rdir), "--name", OC_NAME,
            "--epochs", str(epochs), "--lr", repr(lr), "--beta1", repr(ADAM_BETAS[0]),
            "--beta2", repr(ADAM_BETAS[1]), "--eps", repr(ADAM_EPS), "--lr-scheduler", "cosine",
            "--batch-size", str(batch_size), "--precision", precision, "--workers", str(workers),
            "--seed", str(seed), "--device", device, "--save-frequency", str(save_frequency),
            "--log-every-n-steps", "1", "--report-to", "",
        ]
        # fmt: on
        try:
            probe = parse_args([*oc, "--warmup", "0", *extra_args])
        except SystemExit as exc:
            raise CPTError(
                f"open_clip_train rejected the arguments {list(extra_args)}: see the message above"
            ) from exc
        steps = _steps_per_epoch(len(df), batch_size, world, probe.accum_freq)
        if steps < 1:
            raise CPTError(
                f"training CSV {csv_path} has {len(df)} rows: fewer than one batch of {batch_size * world} "
                f"(batch_size x processes); open_clip_train drops the last partial batch"
            )
        if warmup is None:
            warmup = max(1, round(0.1 * steps * epochs))
        oc += ["--warmup", str(warmup), *extra_args]
        if world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "-m"]
        else:
            cmd = [sys.executable, "-m"]
        config = {
            "model": model, "pretrained": pretrained, "train_csv": str(csv_path), "n_rows": len(df),
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "precision": precision, "warmup": warmup,
            "workers": workers, "seed": seed, "device": device, "extra_args": list(extra_args),
            "nproc_per_node": world, "accum_freq": probe.accum_freq, "steps_per_epoch": steps,
            "total_steps": steps * epochs, "argv": [*cmd, "open_clip_train.main", *oc], "cwd": os.getcwd(),
            **model_info,
        }  # fmt: skip
    except BaseException:
        shutil.rmtree(rdir, ignore_errors=True)
        catalog.delete_cpt_run(ws, run_id)
        raise
    catalog.set_cpt_config(ws, run_id, json.dumps(config), ACTIVE)
    _supervise(ws, run_id, config, progress)
    return run_id


def _audit_launch(
    ws: Workspace, actor: Actor, run_id: int, selection_id: int | None, source: Any, recipe: Recipe, seed: int
) -> None:
    """The training launch in the audit trail: who, the selection's score run, the recipe."""
    selection = catalog.selection_rows(ws, selection_id) if selection_id is not None else pd.DataFrame()
    score_run_id = (
        None
        if selection.empty or pd.isna(selection["score_run_id"].iloc[0])
        else int(selection["score_run_id"].iloc[0])
    )
    audit.record(
        ws,
        actor,
        "train",
        "launch",
        pool_id=None if selection.empty else int(selection["pool_id"].iloc[0]),
        object_id=run_id,
        score_run_id=score_run_id,
        params={"source": str(source), "seed": seed, "recipe": asdict(recipe)},
    )


def run_config(ws: Workspace, cpt_run_id: int) -> dict:
    """The run's recorded row: config (dict), status, checkpoint, log_dir, selection_id."""
    row = catalog.cpt_run_row(ws, cpt_run_id)
    if row is None:
        raise CPTError(f"no CPT run {cpt_run_id} in workspace {ws.root}")
    return {"config": json.loads(row[0]), "status": row[1], "checkpoint": row[2], "log_dir": row[3],
            "selection_id": row[4]}  # fmt: skip


def _set_status(ws: Workspace, run_id: int, status: str, checkpoint: str | None = None) -> None:
    if status == ACTIVE:
        catalog.set_cpt_status(ws, run_id, status, active=True)
    else:
        catalog.set_cpt_status(ws, run_id, status, _now(), checkpoint)


def _write_progress(ws: Workspace, run_id: int, rows: list[dict], checkpoint: str | None) -> str:
    """Store progress rows (and the newest checkpoint); returns the run's status as recorded now."""
    with ws.connect() as con:
        catalog.insert_cpt_progress(
            con,
            [
                [
                    run_id,
                    r["step"],
                    r["epoch"],
                    r["loss"],
                    r["lr"],
                    r["samples_per_s"],
                    r.get("logged_at") or _now(),
                ]
                for r in rows
            ],
        )
        if checkpoint:
            catalog.set_cpt_checkpoint(con, run_id, checkpoint)
        return catalog.cpt_run_status(con, run_id)


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a zombie leader has ended; its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the process group (leader pid = pgid); SIGKILL it if the leader outlives `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _supervise(
    ws: Workspace, run_id: int, config: dict, progress: ProgressFn | None, resume: bool = False
) -> None:
    """Run the recorded command, parse its log into progress rows and record how it ended."""
    from open_clip_train.params import parse_args

    rdir = run_dir(ws, run_id)
    argv = config["argv"] + (["--resume", "latest"] if resume else [])
    oc_args = parse_args(argv[argv.index("open_clip_train.main") + 1 :])
    steps, world, accum = config["steps_per_epoch"], config["nproc_per_node"], config["accum_freq"]
    lr_at = _lr_fn(oc_args, steps)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(rdir / "train.log", "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
        start_new_session=True, cwd=config["cwd"],
    )  # fmt: skip
    atomic_write_bytes(rdir / "pid", str(proc.pid).encode())
    last_flush = -math.inf  # the first row is stored at once
    old_term = None
    if threading.current_thread() is threading.main_thread():
        # a job runner stopping this process with SIGTERM must take the training group down too
        old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lines: queue.Queue[str | None] = queue.Queue()

    def _read() -> None:  # the pipe is read apart, so that pending rows are stored while the log is quiet
        for text in proc.stdout:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=_read, name=f"cpt-{run_id}-log", daemon=True).start()
    tail: list[str] = []
    pending: list[dict] = []
    interrupted = False
    try:
        while True:
            try:
                line = lines.get(timeout=FLUSH_S)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                log.write(line)
                log.flush()
                tail = (tail + [line])[-40:]
            new_ckpt = None
            started = _START_EPOCH.search(line)
            if started and int(started[1]) > 0:
                new_ckpt = str(rdir / OC_NAME / "checkpoints" / f"epoch_{started[1]}.pt")
                new_ckpt = new_ckpt if Path(new_ckpt).is_file() else None
            row = parse_progress(line, steps, oc_args.batch_size, world, accum) if line else None
            if row is not None:
                row["lr"] = lr_at(row["step"]) if lr_at else row["lr"]
                row["total_steps"] = config["total_steps"]
                row["logged_at"] = _now()
                pending.append(row)
                if progress is not None:
                    progress(dict(row))
            # stored at once, then at most every FLUSH_S (also while no line comes: an epoch's last steps
            # are not held back until the next epoch starts)
            if pending and (new_ckpt or not line or time.monotonic() - last_flush > FLUSH_S):
                if _write_progress(ws, run_id, pending, new_ckpt) == "cancelled":
                    _kill_group(proc.pid, grace_s=5.0)  # a cancel that came before the pid file existed
                pending, last_flush = [], time.monotonic()
        rc = proc.wait()
    except BaseException as exc:
        # SIGTERM (the job was cancelled: sys.exit(143) above or JobCancelled) or Ctrl-C: the user stopped it
        interrupted = not isinstance(exc, Exception)
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid, grace_s=5.0)
            proc.wait()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        log.close()
        if pending:
            _write_progress(ws, run_id, pending, None)
        if run_config(ws, run_id)["status"] == ACTIVE and proc.returncode != 0:
            _set_status(ws, run_id, "cancelled" if interrupted else "failed")
    if run_config(ws, run_id)["status"] == "cancelled":
        return
    final = rdir / OC_NAME / "checkpoints" / f"epoch_{config['epochs']}.pt"
    if rc == 0 and final.is_file():
        if not config["model"].startswith("local-dir:"):  # sidecar: load_model(checkpoint) finds the name
            for ck in checkpoints(ws, run_id):
                sidecar = json.dumps({"model": config["model"]}).encode()
                atomic_write_bytes(ck.with_name(ck.name + ".json"), sidecar)
        _set_status(ws, run_id, "finished", str(final))
        return
    _set_status(ws, run_id, "failed")
    raise CPTError(
        f"CPT run {run_id} failed (exit code {rc}); log {rdir / 'train.log'}:\n" + "".join(tail[-15:])
    )


@dataclass(frozen=True)
class RunProgress:
    """Where a CPT run stands, from its progress rows: steps done of total, epoch, last loss, ETA."""

    status: str
    done: int  # optimizer steps done
    total: int | None  # steps of the whole run (None before the run is configured)
    epoch: float | None
    epochs: int | None
    loss: float | None
    samples_per_s: float | None
    eta_s: float | None  # seconds left at the recent pace (None until two steps are logged, or when ended)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def live_progress(ws: Workspace, cpt_run_id: int, pace_rows: int = 20) -> RunProgress:
    """The run's progress now (read while it trains): the ETA is the remaining steps at the mean time per
    step of the last `pace_rows` logged steps."""
    info = run_config(ws, cpt_run_id)
    rows = catalog.cpt_progress(ws, cpt_run_id)
    total, epochs = info["config"].get("total_steps"), info["config"].get("epochs")
    if rows.empty:
        return RunProgress(info["status"], 0, total, None, epochs, None, None, None)
    last = rows.iloc[-1]
    done = int(last["step"]) + 1
    eta = None
    recent = rows.tail(pace_rows)
    if info["status"] == ACTIVE and total and len(recent) >= 2:
        steps = float(recent["step"].iloc[-1] - recent["step"].iloc[0])
        secs = (recent["logged_at"].iloc[-1] - recent["logged_at"].iloc[0]).total_seconds()
        if steps > 0 and secs > 0:
            eta = max(0.0, (total - done) * secs / steps)
    return RunProgress(
        info["status"], done, total, float(last["epoch"]), epochs, float(last["loss"]),
        float(last["samples_per_s"]), eta,
    )  # fmt: skip


def status(ws: Workspace, cpt_run_id: int) -> str:
    """The run's status; a 'running' run whose process group is gone is reported (and recorded) 'failed'."""
    info = run_config(ws, cpt_run_id)
    pid_file = Path(info["log_dir"]) / "pid"
    if info["status"] == ACTIVE and pid_file.is_file() and not _alive(int(pid_file.read_text())):
        time.sleep(0.5)  # the supervisor may be recording the end right now
        info = run_config(ws, cpt_run_id)
        if info["status"] == ACTIVE:
            _set_status(ws, cpt_run_id, "failed")
            return "failed"
    return info["status"]


def cancel(ws: Workspace, cpt_run_id: int, grace_s: float = 10.0) -> bool:
    """Stop a running CPT run from any process (SIGTERM to its process group, SIGKILL after `grace_s`).

    Returns False when the run was not running. Epochs already checkpointed are kept for `resume`.
    """
    info = run_config(ws, cpt_run_id)
    if info["status"] != ACTIVE:
        return False
    _set_status(ws, cpt_run_id, "cancelled")
    pid_file = Path(info["log_dir"]) / "pid"
    if pid_file.is_file():
        _kill_group(int(pid_file.read_text()), grace_s)
    return True


def resume(ws: Workspace, cpt_run_id: int, progress: ProgressFn | None = None) -> int:
    """Continue a cancelled or failed run from its newest epoch checkpoint (`--resume latest`)."""
    info = run_config(ws, cpt_run_id)
    if status(ws, cpt_run_id) == ACTIVE:
        raise CPTError(f"CPT run {cpt_run_id} is still running; cancel it first")
    if info["status"] == "finished":
        raise CPTError(f"CPT run {cpt_run_id} already finished ({info['checkpoint']})")
    _set_status(ws, cpt_run_id, ACTIVE)
    _supervise(ws, cpt_run_id, info["config"], progress, resume=True)
    return cpt_run_id
