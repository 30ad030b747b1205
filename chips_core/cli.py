"""The `chips` command line: one subcommand per pipeline stage, each a thin call into the library.

A subcommand is a `Command`: a name, a one-line help, `add_arguments(parser)` and `run(args) -> int`.
Built-in commands are registered below. Other modules add theirs without editing this file by defining

    def register_cli(register):            # in a module listed in EXTENSION_MODULES
        register("train", "continually pre-train on a selection", add_train_arguments, run_train)

`run` raises the library's user-facing errors (WorkspaceError and its subclasses, ValueError,
FileNotFoundError...) for bad input: `main` turns them into ONE line on stderr and exit status 1; any other
exception is an internal error (exit 2; CHIPS_DEBUG=1 prints the traceback). `progress_bar(desc)` gives a
tqdm bar (pairs/s, ETA) that also feeds the background-job progress when running under
`chips_core.workspace.jobs`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chips_core.engines.pipeline import load_run_model, prepare_workspace
from chips_core.scoring import presets
from chips_core.workspace.store import Workspace, WorkspaceError

EXTENSION_MODULES = (
    "chips_core.training.cpt",
    "chips_core.training.evaluate",
    "chips_core.training.experiment",
)


@dataclass(frozen=True)
class Command:
    """One subcommand: its parser setup and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
_job_reporter: Any = None  # a jobs.JobReporter while this process runs as a background job


def register(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add a subcommand (later registrations of the same name replace earlier ones)."""
    COMMANDS[name] = Command(name, help, add_arguments, run)


class CliError(WorkspaceError):
    """A command-line problem with a message meant for the user."""


# --- cheap argparse types: bad parameters are refused before anything heavy is imported ----------------


def _ranged(
    cast: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], Any]:
    """An argparse type: `cast(text)` that must be finite and lie in the interval (lo, hi) given."""
    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    if lo is not None and hi is not None:
        want = f"a number in {left}, {right}"
    elif lo is not None:
        want = ("a number > " if lo_open else "a number ≥ ") + f"{lo:g}"
    else:
        want = ("a number < " if hi_open else "a number ≤ ") + f"{hi:g}"
    if cast is int:
        want = want.replace("a number", "an integer")

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is not {want}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its messages
    return parse


def _positive(cast: type) -> Callable[[str], Any]:
    return _ranged(cast, 0, lo_open=True)


UNIT = _ranged(float, 0, 1)  # α, β
FRACTION = _ranged(float, 0, 1, lo_open=True)  # a selection ratio


# --- helpers shared by commands -------------------------------------------------------------------------


def workspace(path: str, must_exist: bool = True) -> Workspace:
    """The workspace at `path`; unless must_exist=False, a WorkspaceError names it when not initialised."""
    ws = Workspace(path)
    if must_exist:
        ws.check()
    return ws


class progress_bar:  # noqa: N801 (used like a function: `with progress_bar("featurize") as cb:`)
    """A tqdm bar usable as a library progress callback, forwarding to the job table when in a job.

    Accepts `cb(done, total)`, `cb(done, total, **extra)`, `cb(dict)` (done/total or step/total_steps) and
    `cb(obj)` with `.done`/`.total`. Bars show only on a terminal unless CHIPS_PROGRESS=1.
    """

    def __init__(self, desc: str, unit: str = "pair") -> None:
        from tqdm import tqdm

        force = os.environ.get("CHIPS_PROGRESS")
        disable = None if force is None else force in ("0", "")
        self.desc = desc
        self.bar = tqdm(
            desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, disable=disable, file=sys.stderr
        )

    def __enter__(self) -> progress_bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        done, total, extra = None, None, dict(kwargs)
        if len(args) == 1 and isinstance(args[0], dict):
            extra.update(args[0])
            done = extra.pop("done", extra.get("step"))
            total = extra.pop("total", extra.get("total_steps"))
        elif len(args) == 1 and hasattr(args[0], "done"):
            done, total = args[0].done, getattr(args[0], "total", None)
        elif args:
            done = args[0]
            total = args[1] if len(args) > 1 else None
        if total is not None and self.bar.total != total:
            self.bar.total = total
        if done is not None:
            self.bar.update(max(0, int(done) - self.bar.n))
        if extra:
            self.bar.set_postfix(
                {k: v for k, v in extra.items() if isinstance(v, int | float | str)}, refresh=False
            )
        if _job_reporter is not None:
            fraction = float(done) / total if done is not None and total else None
            msg = f"{self.desc}: {done}" + (f"/{total}" if total else "")
            _job_reporter.progress(fraction, msg)


def say(text: str) -> None:
    """Print a result line on stdout (flushed: job logs show it at once)."""
    print(text, flush=True)


def note(text: str) -> None:
    """Print a note on stderr (a parameter was adjusted, which run was chosen...)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """Print a warning on stderr (the command succeeded but its result needs care)."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


# --- init / status ----------------------------------------------------------------------------------------


def _add_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder (created if missing)")


def _run_init(args: argparse.Namespace) -> int:
    ws = Workspace.init(args.ws)
    say(f"workspace ready at {ws.root}")
    return 0


def _add_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _run_status(args: argparse.Namespace) -> int:
    from chips_core.workspace import jobs

    ws = workspace(args.ws)
    queries = {
        "pools": "SELECT p.pool_id, p.name, p.kind, p.format, p.status, "
        "(SELECT count(*) FROM pairs x WHERE x.pool_id = p.pool_id) AS pairs, "
        "(SELECT count(*) FROM rejects r WHERE r.pool_id = p.pool_id) AS rejects, p.source, "
        "json_extract_string(p.options, '$.encoding_detected') AS encoding, "
        "json_extract_string(p.options, '$.error') AS error "
        "FROM pools p ORDER BY 1",
        "feature runs": "SELECT f.run_id, p.name AS pool, m.name AS model, m.pretrained, f.status, f.n_pairs "
        "FROM feature_runs f LEFT JOIN pools p USING (pool_id) LEFT JOIN models m USING (model_id) "
        "ORDER BY 1",
        "scoring caches": "SELECT cache_id, pool_run_id, eval_run_id, status, dir FROM scoring_caches "
        "ORDER BY 1",
        "score runs": "SELECT s.score_run_id, p.name AS pool, s.method, s.cache_id, s.created_at "
        "FROM score_runs s LEFT JOIN pools p USING (pool_id) ORDER BY 1",
        "selections": "SELECT s.selection_id, s.name, s.version, p.name AS pool, s.ratio, s.n_selected, "
        "s.score_run_id FROM selections s LEFT JOIN pools p USING (pool_id) ORDER BY 1",
        "decisions": "SELECT p.name AS pool, d.action, count(*) AS n FROM decisions d "
        "LEFT JOIN pools p USING (pool_id) GROUP BY ALL ORDER BY 1, 2",
        "exports": "SELECT export_id, selection_id, format, path FROM exports ORDER BY 1",
        "cpt runs": "SELECT cpt_run_id, selection_id, status, checkpoint FROM cpt_runs ORDER BY 1",
    }
    jobs.list_jobs(ws)  # records dead jobs as failed before they are shown
    queries["jobs"] = (
        "SELECT job_id, kind, status, round(progress, 3) AS progress, message FROM jobs ORDER BY 1"
    )
    out: dict[str, Any] = {}
    with ws.connect(read_only=True) as con:
        for title, sql in queries.items():
            out[title] = con.execute(sql).df()
        dirs = dict(con.execute("SELECT run_id, dir FROM feature_runs WHERE status = 'running'").fetchall())
    runs = out["feature runs"]
    for i in runs.index[runs["status"] == "running"]:
        if not _writer_alive(Path(dirs[int(runs.at[i, "run_id"])])):
            runs.at[i, "status"] = "interrupted"
    if args.json:
        say(json.dumps({k: v.to_dict("records") for k, v in out.items()}, default=str))
        return 0
    say(f"workspace {ws.root}")
    for title, df in out.items():
        say(f"\n{title}: {len(df)}")
        if len(df):
            say(df.to_string(index=False, max_colwidth=60))
    return 0


def _writer_alive(run_dir: Path) -> bool:
    """Whether a process holds the writer's flock of a feature run (features.run_lock); the OS drops the
    lock of a killed process, so a 'running' run without a holder was interrupted (re-run featurize)."""
    import fcntl

    lock = run_dir / "lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


register("init", "create a workspace folder (idempotent)", _add_init, _run_init)
register(
    "status", "show what a workspace holds (pools, runs, selections, exports, jobs)", _add_status, _run_status
)


# --- ingest -------------------------------------------------------------------------------------------------


def _add_ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("name", metavar="NAME", help="name of the pool (or eval set) in the workspace")
    p.add_argument(
        "source", metavar="SOURCE", help="manifest (csv/tsv/parquet), image folder, .tar shards, DICOM"
    )
    p.add_argument("--eval", action="store_true", help="ingest as a target evaluation set instead of a pool")
    p.add_argument(
        "--image-col", default="filepath", help="manifest column with image paths (default filepath)"
    )
    p.add_argument("--caption-col", default="title", help="manifest column with captions (default title)")
    p.add_argument("--label-col", default=None, help="column (or WebDataset json key) with class labels")
    p.add_argument(
        "--format", dest="fmt", default=None, help="csv|tsv|parquet|folder|wds|dicom (default: detect)"
    )
    p.add_argument(
        "--sep", default=None, help="manifest separator (default: from the extension, else sniffed)"
    )
    p.add_argument(
        "--caption-template",
        default=None,
        help='DICOM caption template, e.g. "{Modality} {BodyPartExamined}"',
    )
    p.add_argument("--json-caption-key", default="caption", help="caption key in WebDataset json members")
    p.add_argument(
        "--workers", type=int, default=None, help="image-checking processes (default min(8, CPUs))"
    )
    p.add_argument(
        "--encoding",
        default="auto",
        help="text encoding of csv/tsv manifests and caption files, e.g. utf-8, cp1252, latin-1 "
        "(default auto: detected, reported and recorded with the pool)",
    )
    p.add_argument(
        "--allow-outside",
        action="append",
        default=[],
        metavar="DIR",
        help="also accept image paths that resolve (after symlinks) into DIR; repeatable "
        "(default: only inside the source's folder; others are rejected as outside_root)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing pool of this name ingested from another source or with other options "
        "(a failed pool is replaced without it); refused while feature runs, selections... depend on it "
        "(see `chips rm`)",
    )


def _run_ingest(args: argparse.Namespace) -> int:
    from chips_core.pools.ingest import IngestError, ingest

    ws = workspace(args.ws)
    try:
        with progress_bar(f"ingest {args.name}", unit="record") as bar:
            summary = ingest(
                ws,
                args.name,
                args.source,
                kind="eval" if args.eval else "pool",
                image_col=args.image_col,
                caption_col=args.caption_col,
                label_col=args.label_col,
                fmt=args.fmt,
                progress=bar,
                sep=args.sep,
                caption_template=args.caption_template,
                json_caption_key=args.json_caption_key,
                workers=args.workers,
                encoding=args.encoding,
                allow_outside=args.allow_outside,
                replace=args.replace,
            )
    except IngestError as exc:
        if exc.summary is not None:  # what was checked and rejected, then the one-line error
            say(exc.summary.format())
        raise
    say(summary.format())
    return 0


def _add_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("name", metavar="NAME", help="pool or eval set to remove")
    p.add_argument(
        "--force",
        action="store_true",
        help="also remove what depends on it (feature runs, scoring caches, score runs, selections, "
        "exports, decisions); without it such a pool is refused and they are listed",
    )


def _run_rm(args: argparse.Namespace) -> int:
    from chips_core.workspace.remove import remove_pool

    say(remove_pool(workspace(args.ws), args.name, force=args.force).format())
    return 0


register("ingest", "read and validate a pool or eval set into the workspace", _add_ingest, _run_ingest)
register("rm", "remove a pool or eval set (and, with --force, what depends on it)", _add_rm, _run_rm)


# --- featurize / prepare / score ------------------------------------------------------------------------


def _add_featurize(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("name", metavar="NAME", help="pool or eval set to featurize")
    p.add_argument(
        "--model", required=True, help="open_clip name, checkpoint file, local-dir:DIR or hf-hub:ID"
    )
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="use seeded random weights on purpose (needed when the model has pretrained tags and no "
        "--pretrained is given)",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present"
    )
    p.add_argument(
        "--batch-size", type=_ranged(int, 1), default=256, help="images per encoder batch (default 256)"
    )
    p.add_argument(
        "--workers", type=_ranged(int, 0), default=0, help="DataLoader worker processes (default 0)"
    )
    p.add_argument(
        "--checkpoint-s",
        type=_positive(float),
        default=30.0,
        help="seconds between checkpoints of the shard being written: a killed run redoes at most this "
        "much (default 30; local engine)",
    )
    _add_engine_options(p)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (Ray Data needs `pip install -r requirements-ray.txt`)")
    g.add_argument("--engine", default="local", choices=["local", "ray"], help="default: local")
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: HOST:PORT or auto (default: a private local one)",
    )
    g.add_argument(
        "--num-gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor (default 0: CPU actors)"
    )


def _run_featurize(args: argparse.Namespace) -> int:
    ws = workspace(args.ws)
    from chips_core.features.models import check_weights_choice, pretrained_tags

    check_weights_choice(args.model, args.pretrained, args.random_init)
    if args.engine == "ray":
        from chips_core.engines.ray_featurize import featurize_ray as run

        opts = _engine(args)
    else:
        from chips_core.features.featurize import featurize as run

        opts = {"device": args.device, "num_workers": args.workers, "checkpoint_s": args.checkpoint_s}
    with progress_bar(f"featurize {args.name}") as bar:
        run_id = run(
            ws, args.name, args.model, args.pretrained, batch_size=args.batch_size, progress=bar, **opts
        )
    with ws.connect(read_only=True) as con:
        n = con.execute(
            "SELECT coalesce(sum(n_rows), 0) FROM feature_shards WHERE run_id = ?", [run_id]
        ).fetchone()
    say(f"feature run {run_id}: {int(n[0])} pairs of {args.name} featurized with {args.model}")
    weights_elsewhere = args.model.startswith(("hf-hub:", "local-dir:")) or Path(args.model).is_file()
    random = args.pretrained is None and not weights_elsewhere
    if random and (args.random_init or not pretrained_tags(args.model)):
        note(f"{args.model} has random weights (seeded random init, recorded as such)")
    return 0


#: chips_core.scoring.prepare.PrepareConfig's defaults, repeated so that building the parser imports no torch
#: (tests/integration/test_cli.py checks that they agree).
PREPARE_DEFAULTS = {
    "k_max": 1024,
    "sketch": "kronecker",
    "batch_size": 1024,
    "seed": 0,
    "negatives": "all",
    "curvature_pairs": 100_000,
    "negatives_per_row": 8,
    "dtype": "float32",
    "blocks": presets.DEFAULT_BLOCKS,
}


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    d = PREPARE_DEFAULTS
    g = p.add_argument_group("prepare (the scoring cache; a different value makes a new cache)")
    g.add_argument(
        "--k-max", type=_ranged(int, 2), default=d["k_max"], help=f"sketch rows stored (default {d['k_max']})"
    )
    g.add_argument(
        "--sketch", default=d["sketch"], choices=["kronecker", "dense"], help="JL sketch (default kronecker)"
    )
    g.add_argument(
        "--batch-size",
        type=_ranged(int, 2),
        default=d["batch_size"],
        help=f"InfoNCE batch size (default {d['batch_size']})",
    )
    g.add_argument(
        "--seed", type=int, default=d["seed"], help="seed of batches, sketch and negatives (default 0)"
    )
    g.add_argument(
        "--negatives",
        default=d["negatives"],
        choices=["all", "self"],
        help="per-sample gradients with all in-batch negatives (default) or self-only (ablation)",
    )
    g.add_argument(
        "--curvature-pairs",
        type=_ranged(int, 2),
        default=d["curvature_pairs"],
        help=f"pool pairs used to estimate the curvature (default {d['curvature_pairs']})",
    )
    g.add_argument(
        "--negatives-per-row",
        type=_ranged(int, 1),
        default=d["negatives_per_row"],
        help=f"sampled negatives per row for the curvature (default {d['negatives_per_row']})",
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present"
    )
    g.add_argument(
        "--dtype", default=d["dtype"], choices=["float32", "float64"], help="math precision (default float32)"
    )
    g.add_argument(
        "--model",
        default=None,
        help="use the feature runs of this model: open_clip name, NAME:PRETRAINED, model id or checkpoint "
        "file (default: the model the pool was first featurized with)",
    )
    g.add_argument(
        "--model-id",
        type=int,
        default=None,
        help="use the feature runs of this model id (see `chips status`)",
    )
    g.add_argument(
        "--blocks",
        type=_blocks_arg,
        default=None,
        help="endpoint parameter blocks scored, comma-separated from visual, text, temperature "
        f"(default: the preset's; {d['blocks']} for the default preset)",
    )


def _prepare_config(args: argparse.Namespace) -> Any:
    from chips_core.features.models import resolve_device
    from chips_core.scoring.prepare import PrepareConfig

    return PrepareConfig(
        k_max=args.k_max,
        sketch=args.sketch,
        batch_size=args.batch_size,
        seed=args.seed,
        negatives=args.negatives,
        curvature_pairs=args.curvature_pairs,
        negatives_per_row=args.negatives_per_row,
        device=resolve_device(args.device).type,
        dtype=args.dtype,
        blocks=args.blocks or presets.PRESETS[getattr(args, "preset", "default")]["blocks"],
    )


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name (featurized)")
    p.add_argument(
        "--eval", dest="eval_name", required=True, help="eval set name (featurized with the same model)"
    )
    _add_prepare_options(p)
    _add_engine_options(p)


def _engine(args: argparse.Namespace) -> dict | None:
    if args.engine == "local":
        return None
    return {"address": args.address, "num_gpus_per_worker": args.num_gpus_per_worker}


def _prepare(ws: Workspace, args: argparse.Namespace) -> int:
    """The scoring cache of `prepare`/`score`'s arguments (built, resumed or reused), with a progress bar."""
    with progress_bar(f"prepare {args.pool}") as bar:
        return prepare_workspace(
            ws, args.pool, args.eval_name, _prepare_config(args), args.model_id, bar, _engine(args), note,
            args.model,
        )  # fmt: skip


def _run_prepare(args: argparse.Namespace) -> int:
    ws = workspace(args.ws)
    cache_id = _prepare(ws, args)
    with ws.connect(read_only=True) as con:
        cache_dir = con.execute("SELECT dir FROM scoring_caches WHERE cache_id = ?", [cache_id]).fetchone()[0]
    say(f"scoring cache {cache_id} of {args.pool} against {args.eval_name} ready at {cache_dir}")
    return 0


def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name (featurized)")
    p.add_argument(
        "--eval", dest="eval_name", required=True, help="eval set name (featurized with the same model)"
    )
    p.add_argument(
        "--method",
        default="chips",
        choices=["chips", "random", "clipscore", "dot", "tracin", "trak"],
        help="CHIPS (default) or a baseline on the same features and batches (METHOD.md §7)",
    )
    p.add_argument("--alpha", type=UNIT, default=0.7, help="weight of the negative curvature (default 0.7)")
    p.add_argument(
        "--lam", type=_positive(float), default=None, help="damping λ (default λ* with d(λ*) = k/4)"
    )
    p.add_argument(
        "--k", type=_ranged(int, 1), default=None, help="sketch rows used, ≤ k-max (default k-max/2)"
    )
    p.add_argument("--beta", type=UNIT, default=0.5, help="image/text balance of the relevance weight")
    p.add_argument("--ratio", type=FRACTION, default=0.3, help="fraction marked selected (default 0.3)")
    p.add_argument("--rank-seed", type=int, default=0, help="seed of the random baseline (default 0)")
    p.add_argument(
        "--exact", action="store_true", help="CHIPS without the sketch (conjugate gradients; slow)"
    )
    p.add_argument("--no-learnability", action="store_true", help="ablation: w_L ≡ 1")
    p.add_argument("--no-relevance", action="store_true", help="ablation: w_R ≡ 1")
    p.add_argument("--rank-normalized", action="store_true", help="use the rank of Â in (0, 1] instead of Â")
    g = p.add_argument_group(
        "scoring preset (docs/SCORING.md); each flag below overrides the preset's value",
    )
    g.add_argument(
        "--preset",
        default="default",
        choices=list(presets.PRESETS),
        help="default: projections only, unit-norm gradients, λ = 0.1·tr C̃, CLIPScore guard; "
        "paper: the CHIPS paper's literal score (every block, raw gradients, d(λ*) = k/4, no guard)",
    )
    g.add_argument("--damping", choices=presets.DAMPINGS, default=None, help="λ rule: trace | dimension")
    g.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="unit-norm gradients g̃ and ũ (LESS-style cosine)",
    )
    g.add_argument(
        "--guard",
        choices=presets.GUARDS,
        default=None,
        help="mad: hold pairs whose CLIPScore is an outlier below the median out of the selection; none",
    )
    g.add_argument(
        "--guard-mads",
        type=float,
        default=presets.GUARD_MADS,
        help=f"guard threshold in robust standard deviations (default {presets.GUARD_MADS})",
    )
    p.add_argument(
        "--tracin-cache",
        action="append",
        default=[],
        metavar="CACHE_ID[:ETA]",
        help="tracin: scoring cache of a checkpoint's feature runs and its learning rate (repeat)",
    )
    p.add_argument("--out", default=None, help="write the ranking to FILE.parquet or FILE.csv")
    _add_prepare_options(p)
    _add_engine_options(p)


def _run_score(args: argparse.Namespace) -> int:
    ws = workspace(args.ws)
    out = None
    if args.out is not None:
        out = Path(args.out).expanduser().resolve()
        if out.suffix not in (".parquet", ".csv"):
            raise CliError(f"--out {args.out}: use a .parquet or .csv file name")
    if args.exact and args.method != "chips":
        raise CliError("--exact applies to --method chips only")
    if (args.method == "tracin") != bool(args.tracin_cache):
        raise CliError(
            "--method tracin needs --tracin-cache CACHE_ID[:ETA] (one per checkpoint), and only it does"
        )
    from chips_core.curation import selection as sel
    from chips_core.scoring.ranking import ScoringCache, rank, rank_exact

    cache_id = _prepare(ws, args)
    with ws.connect(read_only=True) as con:
        cache_dir, pool_run = con.execute(
            "SELECT dir, pool_run_id FROM scoring_caches WHERE cache_id = ?", [cache_id]
        ).fetchone()
    cache = ScoringCache.load(cache_dir)
    opts = dict(
        alpha=args.alpha,
        lam=args.lam,
        k=args.k,
        beta=args.beta,
        ratio=args.ratio,
        use_learnability=not args.no_learnability,
        use_relevance=not args.no_relevance,
        rank_normalized=args.rank_normalized,
        **_preset_options(args),
    )
    if args.exact:
        from chips_core.features.featurize import FeatureStore

        params = load_run_model(ws, pool_run).adapter.endpoint_params()
        result = rank_exact(cache, FeatureStore(ws, pool_run), params, **opts)
    else:
        checkpoints = [_tracin_cache(ws, spec) for spec in args.tracin_cache] or None
        result = rank(cache, args.method, seed=args.rank_seed, checkpoints=checkpoints, **opts)
    method = "chips-exact" if args.exact else args.method
    params = {
        "method": method,
        "preset": args.preset,
        "blocks": cache.config.blocks,
        "eval": args.eval_name,
        "rank_seed": args.rank_seed,
        "tracin": args.tracin_cache,
        **opts,
        "info": result.info,
    }
    run_id = sel.record_score_run(ws, args.pool, result, method, params, cache_id=cache_id)
    info = result.info
    say(
        f"score run {run_id}: {method} on {args.pool} ({info.get('n', len(result.frame))} pairs) against "
        f"{args.eval_name}, cache {cache_id}"
    )
    for key in ("blocks", "k", "lam", "lam_star", "d_over_k", "frac_positive", "stability", "n_guarded",
                "n_selected"):  # fmt: skip
        if info.get(key) is not None:
            value = info[key]
            say(f"  {key:<14}{value:.6g}" if isinstance(value, float) else f"  {key:<14}{value}")
    if info.get("n_guarded"):
        say(
            f"  guard held {info['n_guarded']} pairs out of the selection: their CLIPScore (image–caption "
            f"agreement) is below {info['guard_threshold']:.4g}, an outlier under the pool's median "
            "(--guard none keeps them)"
        )
    from chips_core.scoring.diagnostics import stability_warning

    if (message := stability_warning(info.get("stability"))) is not None:
        warn(message)
    if out is not None:
        table = _score_table(ws, args.pool, result)
        from chips_core.workspace.store import atomic_path

        with atomic_path(out) as tmp:
            if out.suffix == ".parquet":
                table.to_parquet(tmp, index=False)
            else:
                table.to_csv(tmp, index=False)
        say(f"  wrote {len(table)} rows to {out}")
    return 0


def _blocks_arg(text: str) -> str:
    """argparse type of --blocks: a canonical comma-separated block list."""
    try:
        return ",".join(presets.parse_blocks(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _preset_options(args: argparse.Namespace) -> dict:
    """rank() options of --preset with the flags that override it; the baselines stay literal unless a
    guard is asked for."""
    if args.method != "chips":
        return {"guard": args.guard or "none", "guard_mads": args.guard_mads}
    opts = presets.rank_options(args.preset) | {"guard_mads": args.guard_mads}
    for name in ("damping", "normalize", "guard"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    return opts


def _tracin_cache(ws: Workspace, spec: str) -> tuple[Any, float]:
    from chips_core.scoring.ranking import ScoringCache

    cid, _, eta = spec.partition(":")
    try:
        cache_id, lr = int(cid), float(eta) if eta else 1.0
    except ValueError:
        raise CliError(f"--tracin-cache {spec!r}: expected CACHE_ID or CACHE_ID:ETA") from None
    with ws.connect(read_only=True) as con:
        row = con.execute(
            "SELECT dir FROM scoring_caches WHERE cache_id = ? AND status = 'done'", [cache_id]
        ).fetchone()
    if row is None:
        raise CliError(f"--tracin-cache: no finished scoring cache {cache_id}")
    return ScoringCache.load(row[0]), lr


def _score_table(ws: Workspace, pool: str, result: Any) -> Any:
    """The ranking joined with the pool's pairs: pair_id, filepath, caption, label and every component."""
    from chips_core.curation.selection import rank_frame, resolve_pool

    frame = rank_frame(result)
    pool_id = resolve_pool(ws, pool)
    with ws.connect(read_only=True) as con:
        pairs = con.execute(
            "SELECT pair_id, filepath, caption, label FROM pairs WHERE pool_id = ?", [pool_id]
        ).df()
    table = frame.merge(pairs, on="pair_id", how="left")
    first = [
        "pair_id",
        "filepath",
        "caption",
        "label",
        "alignment",
        "learnability",
        "relevance",
        "score",
        "rank",
    ]
    return table[first + [c for c in table.columns if c not in first]]


register(
    "featurize",
    "run the encoders once per pair and cache pre-projection features",
    _add_featurize,
    _run_featurize,
)
register(
    "prepare",
    "build the scoring cache (sketched gradients, curvature, target gradient)",
    _add_prepare,
    _run_prepare,
)
register("score", "rank a pool by CHIPS or a baseline (prepares if needed)", _add_score, _run_score)


# --- curation: select / decide / diff / export ----------------------------------------------------------


def _add_select(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument(
        "sel", metavar="SEL", help="name of the selection to save (saving it again makes version + 1)"
    )
    p.add_argument("--pool", default=None, help="pool name (default: the only pool with score runs)")
    p.add_argument("--ratio", type=FRACTION, required=True, help="fraction of the pool to keep, in (0, 1]")
    p.add_argument("--score-run", type=int, default=None, help="score run id (default: the pool's latest)")
    p.add_argument(
        "--name",
        default=None,
        help="the older form `chips select WS POOL --name SEL` (SEL is then the pool); still accepted",
    )


def _select_target(ws: Workspace, args: argparse.Namespace) -> tuple[str, str]:
    """(pool, selection name) of a `select` call, in the current or the older argument form."""
    if args.name is not None:
        return args.sel, args.name
    name = args.sel
    if name.lstrip("-").isdigit() or "@" in name:
        raise CliError(
            f"selection name {name!r}: use a name that is not a number and has no '@' (selections are "
            "referred to as NAME, ID or NAME@VERSION)"
        )
    if args.pool is not None:
        return args.pool, name
    with ws.connect(read_only=True) as con:
        if args.score_run is not None:
            row = con.execute(
                "SELECT p.name FROM score_runs s JOIN pools p USING (pool_id) WHERE s.score_run_id = ?",
                [args.score_run],
            ).fetchone()
            if row is None:
                raise CliError(f"no score run {args.score_run} in {ws.root}")
            return row[0], name
        pools = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT p.name FROM score_runs s JOIN pools p USING (pool_id) ORDER BY 1"
            ).fetchall()
        ]
    if len(pools) == 1:
        return pools[0], name
    if not pools:
        raise CliError("no pool has a score run yet; run `chips score` first")
    raise CliError(f"several pools have score runs ({', '.join(pools)}); choose one with --pool")


def _run_select(args: argparse.Namespace) -> int:
    from chips_core.curation import selection as sel

    ws = workspace(args.ws)
    pool, name = _select_target(ws, args)
    run = args.score_run
    if run is None:
        pool_id = sel.resolve_pool(ws, pool)
        with ws.connect(read_only=True) as con:
            row = con.execute(
                "SELECT max(score_run_id) FROM score_runs WHERE pool_id = ?", [pool_id]
            ).fetchone()
        if row[0] is None:
            raise CliError(f"pool {pool!r} has no score run yet; run `chips score` first")
        run = int(row[0])
    sid = sel.save_selection(ws, pool, run, args.ratio, name)
    info = sel.get_selection(ws, sid)
    dec = info.params["decisions"]
    say(
        f"selection {info.name} v{info.version} (id {sid}, {info.name}@{info.version}): {info.n_selected} "
        f"of {info.params['n_ranked']} pairs of {pool} "
        f"from score run {run} ({info.params['score_run']['method']}); decisions applied: "
        f"{len(dec['include'])} included, {len(dec['exclude'])} excluded"
    )
    return 0


def _add_decide(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name")
    p.add_argument(
        "pair_id",
        metavar="PAIR_ID",
        type=_pair_ref,
        help="the pair's id (see `chips score --out`), or @FILE: ids in a .npy file or one per line",
    )
    p.add_argument(
        "action",
        metavar="ACTION",
        choices=["include", "exclude", "clear", "note"],
        help="include | exclude | clear | note",
    )
    p.add_argument("--note", default=None, help="free-text note kept with the decision")
    p.add_argument("--author", default=None, help="who decides (default: $CHIPS_AUTHOR or the login name)")
    p.add_argument("--score-run", type=int, default=None, help="score run the decision was made on")


def _pair_ref(text: str) -> int | str:
    """A pair id, or '@FILE' kept as text (read when the command runs, so a bad file is a one-line error)."""
    if text.startswith("@"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid pair id {text!r}: expected an integer or @FILE") from None


def _read_ids(path: Path) -> list[int]:
    """Pair ids from a .npy array or a text file (one per line; blank lines and # comments skipped)."""
    import numpy as np

    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype.kind not in "iu":
            raise CliError(f"{path}: expected an integer array of pair ids, got dtype {arr.dtype}")
        return [int(x) for x in arr.reshape(-1)]
    ids = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                ids.append(int(text))
            except ValueError:
                raise CliError(f"{path}, line {n}: {text!r} is not a pair id") from None
    return ids


def _run_decide(args: argparse.Namespace) -> int:
    from chips_core.curation import selection as sel

    ws = workspace(args.ws)
    if isinstance(args.pair_id, int):
        did = sel.record_decision(
            ws, args.pool, args.pair_id, args.action, args.note, args.author, args.score_run
        )
        say(f"decision {did}: {args.action} pair {args.pair_id} in pool {args.pool}")
        return 0
    ids = _read_ids(Path(args.pair_id[1:]).expanduser())
    sel.record_decisions(ws, args.pool, ids, args.action, args.note, args.author, args.score_run)
    say(f"{len(set(ids))} decisions: {args.action} pairs from {args.pair_id[1:]} in pool {args.pool}")
    return 0


def _add_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("a", metavar="SEL_A", help="selection id, name (latest version) or name@version")
    p.add_argument("b", metavar="SEL_B", help="selection id, name (latest version) or name@version")
    p.add_argument("--list", action="store_true", help="also print the pair ids that differ")


def _run_diff(args: argparse.Namespace) -> int:
    from chips_core.curation import selection as sel

    d = sel.diff_selections(workspace(args.ws), _sel_ref(args.a), _sel_ref(args.b))
    say(d.summary())
    if args.list:
        for label, ids in (("only in first", d.only_a), ("only in second", d.only_b)):
            say(f"{label}: " + " ".join(str(int(x)) for x in ids))
    return 0


def _sel_ref(text: str) -> str | int:
    """A selection reference as every command takes it: an id, a name (latest version) or name@version."""
    return int(text) if text.lstrip("-").isdigit() else text


def selection_id(ws: Workspace, ref: str | int) -> int:
    """The id of the selection `ref` names (id, name or name@version); a SelectionError names a bad one."""
    from chips_core.curation import selection as sel

    return sel.get_selection(ws, _sel_ref(str(ref))).selection_id


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("selection", metavar="SEL", help="selection id, name (latest version) or name@version")
    p.add_argument(
        "--format",
        dest="fmt",
        default="csv",
        choices=["csv", "safe-csv", "parquet", "ids"],
        help="csv: open_clip_train-ready; safe-csv: for spreadsheets; "
        "parquet: all score components; ids: .npy of pair ids",
    )
    p.add_argument("--out", default=None, help="output file or folder (default: WS/exports/NAME-vN.EXT)")


def _run_export(args: argparse.Namespace) -> int:
    from chips_core.curation.export import export_selection

    ws = workspace(args.ws)
    with progress_bar("materialise images", unit="image") as bar:
        info = export_selection(ws, _sel_ref(args.selection), args.fmt, args.out, progress=bar)
    say(f"wrote {info.n_rows} rows to {info.path} ({info.format}); manifest {info.manifest_path}")
    if info.materialised:
        say(f"  {info.materialised} images written as PNG beside it (WebDataset members, DICOM, 16-bit)")
    for r in info.rejected:
        say(f"  left out pair {r['pair_id']}: {r['reason']}: {r['detail']}")
    if info.csv_args:
        say("  open_clip_train flags: " + " ".join(_shell_quote(a) for a in info.open_clip_flags()))
    return 0


def _shell_quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


register("select", "save the top RATIO of the latest scores as selection SEL", _add_select, _run_select)
register(
    "decide", "include, exclude, clear or annotate one pair (kept across sessions)", _add_decide, _run_decide
)
register("diff", "compare two saved selections", _add_diff, _run_diff)
register(
    "export",
    "export a selection (open_clip CSV, spreadsheet-safe CSV, parquet, ids)",
    _add_export,
    _run_export,
)


# --- background jobs ------------------------------------------------------------------------------------


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("--cancel", type=int, default=None, metavar="JOB_ID", help="cancel this job")
    p.add_argument("--log", type=int, default=None, metavar="JOB_ID", help="print the end of this job's log")


def _run_jobs(args: argparse.Namespace) -> int:
    from chips_core.workspace import jobs

    ws = workspace(args.ws)
    if args.cancel is not None:
        info = jobs.cancel(ws, args.cancel)
        say(f"job {info.job_id}: {info.status}")
        return 0
    if args.log is not None:
        sys.stdout.write(jobs.read_log(ws, args.log))
        return 0
    listed = jobs.list_jobs(ws)
    if not listed:
        say("no background jobs")
    for j in listed:
        pct = "" if j.progress is None else f"{100 * j.progress:5.1f}%"
        say(f"{j.job_id:>6}  {j.kind:<10} {j.status:<9} {pct:>6}  {j.message or ''}")
    return 0


register("jobs", "list background jobs, show a log, or cancel one", _add_jobs, _run_jobs)


# --- main -----------------------------------------------------------------------------------------------


_broken_extensions: dict[str, str] = {}  # module -> why it could not be loaded


def _load_extensions() -> None:
    """Import EXTENSION_MODULES and call their `register_cli`; a broken one is remembered, not fatal."""
    for name in EXTENSION_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            hook = getattr(importlib.import_module(name), "register_cli", None)
            if callable(hook):
                hook(register)
        except Exception as exc:  # noqa: BLE001 - the built-in commands must keep working
            _broken_extensions[name] = f"{type(exc).__name__}: {_one_line(exc)}"


def build_parser(load_extensions: bool = True) -> argparse.ArgumentParser:
    """The full `chips` parser (extension commands included unless `load_extensions` is False)."""
    if load_extensions:
        _load_extensions()
    parser = argparse.ArgumentParser(
        prog="chips",
        description="CHIPS Studio: score, curate and export image-text pairs for CLIP continual "
        "pre-training.",
        epilog="Every command takes the workspace folder first; see the README's command line reference.",
    )
    parser.add_argument("--job-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job-ws", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def _first_command(argv: list[str]) -> str | None:
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--job-id", "--job-ws"):
            skip = True
            continue
        if not a.startswith("-"):
            return a
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run `chips ARGV`; returns the exit status (0 ok, 1 bad input, 2 internal error, 130 cancelled)."""
    global _job_reporter
    argv = list(sys.argv[1:] if argv is None else argv)
    first = _first_command(argv)
    parser = build_parser(load_extensions=first is None or first not in COMMANDS)
    if first is not None and first not in COMMANDS and _broken_extensions:
        broken = "; ".join(f"{m} ({why})" for m, why in _broken_extensions.items())
        print(
            f"chips: unknown command {first!r}; extension modules failed to load: {broken}", file=sys.stderr
        )
        return 2
    args = parser.parse_args(argv)
    reporter = None
    if args.job_id is not None:
        from chips_core.workspace import jobs

        reporter = jobs.JobReporter(Workspace(args.job_ws), args.job_id)
        reporter.start()
        _job_reporter = reporter
    prog = f"chips {args.command}"
    try:
        code = args._command.run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        _end(reporter, "cancelled", "interrupted")
        return 130
    except BaseException as exc:  # noqa: B036 (job cancellation is a BaseException by design)
        from chips_core.workspace.jobs import JobCancelled

        if isinstance(exc, JobCancelled):
            print(f"{prog}: cancelled", file=sys.stderr)
            _end(reporter, "cancelled", "cancelled by the user")
            return 130
        if isinstance(exc, SystemExit):  # e.g. a SIGTERM handler's sys.exit(143) inside a command
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            status = "done" if code == 0 else "cancelled" if code == 143 else "failed"
            _end(reporter, status, f"exit status {code}" if code else "done")
            raise
        user = isinstance(exc, WorkspaceError | ValueError | OSError)
        user = user or type(exc).__name__.endswith(("LoadError", "CPTError", "ModelError", "PoolError"))
        if os.environ.get("CHIPS_DEBUG"):
            traceback.print_exc()
        msg = _one_line(exc) if user else f"internal error: {type(exc).__name__}: {_one_line(exc)}"
        print(f"{prog}: {msg}", file=sys.stderr)
        _end(reporter, "failed", msg)
        return 1 if user else 2
    _end(reporter, "done" if code == 0 else "failed", "done" if code == 0 else f"exit status {code}")
    return code


def _end(reporter: Any, status: str, message: str) -> None:
    if reporter is not None:
        reporter.finish(status, message)


if __name__ == "__main__":
    sys.exit(main())
