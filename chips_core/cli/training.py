"""`chips train | cpt-cancel | cpt-resume | evaluate | experiment`: CPT, evaluation, method comparison."""

from __future__ import annotations

import argparse
import json
from typing import Any

from chips_core.cli.common import (
    FRACTION,
    UNIT,
    CliError,
    add_weight_flags,
    field_flag,
    open_workspace,
    ranged,
    register,
    say,
    selection_id,
)
from chips_core.engines.pipeline import load_cache
from chips_core.scoring.params import EXPERIMENT_METHODS, RankParams
from chips_core.training.cpt import Recipe
from chips_core.training.experiment import (
    markdown_table,
    run_experiment,
    tracin_checkpoints,
)
from chips_core.workspace import catalog
from chips_core.workspace.progress import progress_bar
from chips_core.workspace.store import Workspace


def _add_recipe(p: Any) -> None:
    """The Recipe flags; their defaults are Recipe's (CHIPS paper, METHOD.md §8)."""
    g = p.add_argument_group("CPT recipe (open_clip_train; defaults from the CHIPS paper)")
    g.add_argument("--model", required=True, help="open_clip name, local-dir:PATH or hf-hub:ID")
    field_flag(g, Recipe, "pretrained", "pretrained tag or a local checkpoint file", show=False)
    field_flag(g, Recipe, "epochs", "epochs", type=ranged(int, 1))
    field_flag(g, Recipe, "lr", "peak learning rate (cosine schedule)", type=ranged(float, 0, lo_open=True))
    field_flag(g, Recipe, "batch_size", "batch size per process", type=ranged(int, 1))
    field_flag(g, Recipe, "warmup", "warm-up steps (default 10%% of the steps)", type=int, show=False)
    field_flag(g, Recipe, "precision", "default amp on CUDA, fp32 elsewhere", show=False)
    field_flag(g, Recipe, "workers", "data loader workers", type=ranged(int, 0))
    field_flag(g, Recipe, "device", "training device")
    field_flag(
        g,
        Recipe,
        "extra_args",
        "more open_clip_train flags, one string ('--wd 0.1')",
        flag="--extra",
        metavar="FLAGS",
        type=str.split,
        show=False,
    )


def _recipe(args: Any) -> Recipe:
    """The Recipe of the recipe flags (every Recipe field has a flag of its name)."""
    from dataclasses import fields

    return Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})


def _bar(desc: str) -> Any:

    bar = progress_bar(desc, unit="step")

    def feed(row: dict) -> None:
        bar({"done": row["step"] + 1, "total": row["total_steps"], "loss": row["loss"], "lr": row["lr"]})

    return bar, feed


def _run_train(args: Any) -> int:
    from chips_core.training import cpt

    ws = open_workspace(args.ws)
    refs = [r for r in (args.sel, args.selection) if r is not None]
    if len(refs) + (args.csv is not None) != 1:
        raise ValueError("give exactly one of SEL (a selection name, id or name@version) or --csv FILE")
    source = selection_id(ws, refs[0]) if refs else args.csv
    bar, feed = _bar("cpt")
    with bar:
        run_id = cpt.train(ws, source, _recipe(args), seed=args.seed, progress=feed)
    info = cpt.run_config(ws, run_id)
    say(f"CPT run {run_id} {info['status']}: {info['checkpoint']}")
    return 0


def _add_train(p: Any) -> None:
    p.add_argument("ws", metavar="WS")
    p.add_argument(
        "sel", metavar="SEL", nargs="?", help="selection: name (latest version), id or name@version"
    )
    p.add_argument("--selection", help=argparse.SUPPRESS)  # the older spelling of SEL
    p.add_argument("--csv", help="an open_clip CSV (filepath,title) instead of a selection")
    p.add_argument("--seed", type=int, default=0)
    _add_recipe(p)


def _add_run_id(p: Any) -> None:
    p.add_argument("ws", metavar="WS")
    p.add_argument("run_id", metavar="RUN", type=int, help="cpt_run_id")


def _run_cancel(args: Any) -> int:
    from chips_core.training import cpt

    ok = cpt.cancel(open_workspace(args.ws), args.run_id)
    say(f"CPT run {args.run_id} " + ("cancelled" if ok else "was not running"))
    return 0 if ok else 1


def _run_resume(args: Any) -> int:
    from chips_core.training import cpt

    ws = open_workspace(args.ws)
    bar, feed = _bar("cpt resume")
    with bar:
        cpt.resume(ws, args.run_id, progress=feed)
    say(f"CPT run {args.run_id} finished: {cpt.run_config(ws, args.run_id)['checkpoint']}")
    return 0


def _add_evaluate(p: Any) -> None:
    from chips_core.training.evaluate import DEFAULT_TEMPLATES

    p.add_argument("ws", metavar="WS")
    p.add_argument("eval", metavar="EVAL", help="eval pool name/id in WS, or a CSV (filepath,title[,label])")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--run",
        help="a finished CPT run: its cpt_run_id, or a selection (name or name@version) for the latest "
        "finished CPT run trained on it (its final checkpoint)",
    )
    who.add_argument("--model", help="open_clip name / local-dir: / hf-hub: / checkpoint file")
    p.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file (with --model)")
    p.add_argument(
        "--with-base",
        action="store_true",
        help="with --run: also evaluate the run's starting weights (unless stored) for before vs after",
    )
    p.add_argument("--random-init", action="store_true", help="random weights on purpose")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--template", action="append", help=f"zero-shot prompt (repeatable; default {DEFAULT_TEMPLATES})"
    )


def _run_evaluate(args: Any) -> int:
    from chips_core.training.evaluate import DEFAULT_TEMPLATES, evaluate, evaluate_run

    ws = open_workspace(args.ws)
    kw = {"device": args.device, "templates": tuple(args.template or DEFAULT_TEMPLATES)}
    if args.run is not None:
        metrics = evaluate_run(ws, _cpt_run(ws, args.run), args.eval, with_base=args.with_base, **kw)
    else:
        from chips_core.features.models import check_weights_choice

        check_weights_choice(args.model, args.pretrained, args.random_init)
        metrics = evaluate(ws, args.model, args.eval, pretrained=args.pretrained, **kw)
    say(json.dumps(metrics, indent=2))
    return 0


def _cpt_run(ws: Workspace, ref: str) -> int:
    """A CPT run id, or the latest finished CPT run of the selection `ref` (name or name@version)."""
    if ref.lstrip("-").isdigit():
        return int(ref)

    sid = selection_id(ws, ref)
    run = catalog.latest_finished_cpt_run(ws, sid)
    if run is None:
        raise CliError(f"selection {ref!r} (id {sid}) has no finished CPT run; run `chips train` first")
    return run


def _add_experiment(p: Any) -> None:

    p.add_argument("ws", metavar="WS")
    p.add_argument("pool", metavar="POOL", help="the pool name (featurized and prepared)")
    p.add_argument("--test", required=True, help="held-out eval set for evaluation (pool name or CSV)")
    p.add_argument("--cache", type=int, required=True, help="scoring cache id of POOL vs the validation set")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(EXPERIMENT_METHODS),
        help="chips: the default preset; chips-paper: the paper's literal score (its own cache blocks); "
        f"tracin needs --tracin-eval (default: {' '.join(EXPERIMENT_METHODS)})",
    )
    p.add_argument("--ratios", nargs="+", type=FRACTION, default=[0.1, 0.2, 0.3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    field_flag(p, RankParams, "alpha", "weight of the negative curvature", type=UNIT)
    p.add_argument("--k", type=ranged(int, 1), default=RankParams().k, help="sketch rows (default k_max/2)")
    add_weight_flags(p)
    p.add_argument("--tracin-eval", help="validation set name for TracIn's checkpoint caches")
    p.add_argument(
        "--tracin-epochs", type=int, default=2, help="epochs of the TracIn warm-up run (full pool)"
    )
    p.add_argument("--tracin-run", type=int, help="reuse this finished CPT run as the TracIn warm-up run")
    p.add_argument("--no-full", action="store_true", help="skip the full-pool cells")
    p.add_argument("--out", default=None, help="output folder (default WS/experiments/<id>); reruns resume")
    p.add_argument("--primary", default="zeroshot_top1", help="metric of summary.md and the plot")
    _add_recipe(p)


def _run_experiment(args: Any) -> int:
    from chips_core.curation import selection
    from chips_core.scoring import ranking
    from chips_core.training import cpt

    ws = open_workspace(args.ws)
    recipe = _recipe(args)
    tracin = None
    if "tracin" in args.methods:
        if not args.tracin_eval:
            raise ValueError(
                "method tracin needs --tracin-eval (the validation set the cache was prepared on)"
            )
        sc = load_cache(ws, args.cache)
        warm = args.tracin_run
        if warm is None:
            ranked = ranking.rank(sc, RankParams(method="random", ratio=1.0))
            name = f"tracin-warmup-{args.pool}"
            full = selection.save_selection(ws, args.pool, ranked, 1.0, name, method="full")
            warm = cpt.train(ws, full, recipe.replace(epochs=args.tracin_epochs))
        say(f"TracIn warm-up CPT run {warm}: featurize + prepare once per checkpoint (reused when done)")
        tracin = tracin_checkpoints(ws, args.pool, args.tracin_eval, warm, sc.config, device=args.device)
    cells = run_experiment(
        ws, args.pool, args.test, args.methods, args.ratios, args.seeds, recipe, cache=args.cache,
        rank_params=RankParams(alpha=args.alpha, k=args.k).replace(  # a flag left None: RankParams' default
            **{w: getattr(args, w) for w in ("agreement", "clipscore_weight") if getattr(args, w) is not None}
        ),
        tracin=tracin, include_full=not args.no_full, out_dir=args.out, primary=args.primary, progress=say,
    )  # fmt: skip
    say(markdown_table(cells, args.primary, args.methods))
    return 0


register("train", "continually pre-train (open_clip_train) on a selection or CSV", _add_train, _run_train)
register("cpt-cancel", "stop a running CPT run (its process group)", _add_run_id, _run_cancel)
register("cpt-resume", "resume a cancelled/failed CPT run from its last epoch", _add_run_id, _run_resume)
register(
    "evaluate", "retrieval R@K and zero-shot accuracy of a model or CPT run", _add_evaluate, _run_evaluate
)
register(
    "experiment",
    "methods x ratios x seeds: select, CPT, evaluate, tables",
    _add_experiment,
    _run_experiment,
)
