"""`chips featurize | prepare | score`: features, the scoring cache and rankings."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from chips_core.cli.common import (
    FRACTION,
    UNIT,
    CliError,
    add_weight_flags,
    field_flag,
    note,
    open_workspace,
    positive,
    ranged,
    register,
    say,
    warn,
)
from chips_core.engines.pipeline import load_run_model, prepare_workspace
from chips_core.scoring import params as sp
from chips_core.scoring.params import PrepareConfig, RankParams
from chips_core.workspace import catalog
from chips_core.workspace.progress import progress_bar
from chips_core.workspace.store import Workspace


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
        "--batch-size", type=ranged(int, 1), default=256, help="images per encoder batch (default 256)"
    )
    p.add_argument(
        "--workers", type=ranged(int, 0), default=0, help="DataLoader worker processes (default 0)"
    )
    p.add_argument(
        "--checkpoint-s",
        type=positive(float),
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
    ws = open_workspace(args.ws)
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
    n = catalog.shard_rows_done(ws, run_id)
    say(f"feature run {run_id}: {n} pairs of {args.name} featurized with {args.model}")
    weights_elsewhere = args.model.startswith(("hf-hub:", "local-dir:")) or Path(args.model).is_file()
    random = args.pretrained is None and not weights_elsewhere
    if random and (args.random_init or not pretrained_tags(args.model)):
        note(f"{args.model} has random weights (seeded random init, recorded as such)")
    return 0


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    """The PrepareConfig flags; their defaults are PrepareConfig's."""
    g = p.add_argument_group("prepare (the scoring cache; a different value makes a new cache)")
    field_flag(g, PrepareConfig, "k_max", "sketch rows stored", type=ranged(int, 2))
    field_flag(g, PrepareConfig, "sketch", "JL sketch", choices=sp.SKETCHES)
    field_flag(g, PrepareConfig, "batch_size", "InfoNCE batch size", type=ranged(int, 2))
    field_flag(g, PrepareConfig, "seed", "seed of batches, sketch and negatives", type=int)
    field_flag(
        g,
        PrepareConfig,
        "negatives",
        "per-sample gradients with all in-batch negatives or self-only (ablation)",
        choices=sp.NEGATIVES,
    )
    field_flag(
        g, PrepareConfig, "curvature_pairs", "pool pairs used to estimate the curvature", type=ranged(int, 2)
    )
    field_flag(
        g,
        PrepareConfig,
        "negatives_per_row",
        "sampled negatives per row for the curvature",
        type=ranged(int, 1),
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present"
    )
    field_flag(g, PrepareConfig, "dtype", "math precision", choices=sp.DTYPES)
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
        f"(default: the preset's; {sp.DEFAULT_BLOCKS} for the default preset)",
    )


def _prepare_config(args: argparse.Namespace) -> PrepareConfig:
    """The PrepareConfig of the prepare flags (each field has a flag of its name); the device resolved and
    the blocks from --blocks, else from the preset."""
    from chips_core.features.models import resolve_device

    values = {f.name: getattr(args, f.name) for f in fields(PrepareConfig) if f.name in vars(args)}
    values["device"] = resolve_device(args.device).type
    values["blocks"] = args.blocks or sp.PRESETS[getattr(args, "preset", "default")]["blocks"]
    return PrepareConfig(**values)


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name (featurized)")
    p.add_argument(
        "--eval", dest="eval_name", required=True, help="eval set name (featurized with the same model)"
    )
    _add_prepare_options(p)
    _add_engine_options(p)
    p.add_argument(
        "--no-map",
        dest="map",
        action="store_false",
        help="skip the pool's UMAP map, computed by default once the cache is written (`chips map`)",
    )


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
    ws = open_workspace(args.ws)
    cache_id = _prepare(ws, args)
    cache_dir, _, pool_run, _ = catalog.scoring_cache(ws, cache_id)
    say(f"scoring cache {cache_id} of {args.pool} against {args.eval_name} ready at {cache_dir}")
    if args.map:
        _map_after_prepare(ws, args.pool, pool_run)
    return 0


def _map_after_prepare(ws: Workspace, pool: str, run_id: int) -> None:
    """The pool's UMAP map, computed now when missing, so that the dashboard's Map page opens at once. The
    cache is ready by then: a failure here is a warning, and the command still succeeds."""
    from chips_core.curation import maps
    from chips_core.features.featurize import FeatureStore

    try:
        source = FeatureStore(ws, run_id)
        if maps.current_map(ws, run_id, source) is not None:
            return
        with progress_bar(f"map {pool}", unit="step") as bar:
            fmap = maps.compute_map(ws, run_id, source, progress=bar)
    except Exception as exc:  # noqa: BLE001 (any failure of the optional map leaves the prepare done)
        warn(f"the map of {pool} was not computed ({type(exc).__name__}: {exc}); `chips map` computes it")
        return
    say(f"map of feature run {run_id} ({pool}): {len(fmap.pair_ids):,} pairs in {maps.map_dir(ws, run_id)}")


def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name (featurized)")
    p.add_argument(
        "--eval", dest="eval_name", required=True, help="eval set name (featurized with the same model)"
    )
    field_flag(
        p,
        RankParams,
        "method",
        "CHIPS or a baseline on the same features and batches (METHOD.md §7)",
        choices=sp.METHODS,
    )
    field_flag(p, RankParams, "alpha", "weight of the negative curvature", type=UNIT)
    p.add_argument(
        "--lam",
        type=positive(float),
        default=RankParams().lam,
        help="damping λ (default: the --damping rule's)",
    )
    p.add_argument(
        "--k", type=ranged(int, 1), default=RankParams().k, help="sketch rows used, ≤ k-max (default k-max/2)"
    )
    field_flag(p, RankParams, "beta", "image/text balance of the relevance weight", type=UNIT)
    field_flag(p, RankParams, "ratio", "fraction marked selected", type=FRACTION)
    field_flag(
        p, RankParams, "seed", "seed of the random baseline", flag="--rank-seed", dest="rank_seed", type=int
    )
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
        choices=list(sp.PRESETS),
        help="default: projections only, unit-norm gradients, λ = 0.1·tr C̃, CLIPScore guard, agreement "
        f"{sp.default_of(sp.RankParams, 'agreement'):g}, CLIPScore weight "
        f"{sp.default_of(sp.RankParams, 'clipscore_weight'):g}; "
        "paper: the CHIPS paper's literal score (every block, raw gradients, d(λ*) = k/4, no guard, "
        "agreement and CLIPScore weight 0)",
    )
    g.add_argument("--damping", choices=sp.DAMPINGS, default=None, help="λ rule: trace | dimension")
    g.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="unit-norm gradients g̃ and ũ (LESS-style cosine)",
    )
    g.add_argument(
        "--guard",
        choices=sp.GUARDS,
        default=None,
        help="mad: hold pairs whose CLIPScore is an outlier below the median out of the selection; none "
        "(default: the preset's; chips only, the baselines stay literal)",
    )
    field_flag(
        g, RankParams, "guard_mads", "guard threshold in robust standard deviations", type=positive(float)
    )
    add_weight_flags(g)
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
    ws = open_workspace(args.ws)
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
    from chips_core.scoring.cache import ScoringCache
    from chips_core.scoring.ranking import rank, rank_exact

    cache_id = _prepare(ws, args)
    cache_dir, _, pool_run, _ = catalog.scoring_cache(ws, cache_id)
    cache = ScoringCache.load(cache_dir)
    params = rank_params(args).replace(blocks=cache.config.blocks)
    if args.exact:
        from chips_core.features.featurize import FeatureStore

        endpoint = load_run_model(ws, pool_run).adapter.endpoint_params()
        result = rank_exact(cache, FeatureStore(ws, pool_run), endpoint, params)
    else:
        checkpoints = [_tracin_cache(ws, spec) for spec in args.tracin_cache] or None
        result = rank(cache, params, checkpoints=checkpoints)
    method = "chips-exact" if args.exact else args.method
    extra = {"preset": args.preset, "eval": args.eval_name, "tracin": args.tracin_cache}
    run_id = sel.record_score_run(ws, args.pool, result, method, extra, cache_id=cache_id)
    info = result.info
    say(
        f"score run {run_id}: {method} on {args.pool} ({info.get('n', len(result.frame))} pairs) against "
        f"{args.eval_name}, cache {cache_id}"
    )
    for key in ("blocks", "k", "lam", "lam_star", "d_over_k", "frac_positive", "stability", "agreement",
                "clipscore_weight", "n_guarded", "n_selected"):  # fmt: skip
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
        return ",".join(sp.parse_blocks(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rank_params(args: argparse.Namespace) -> RankParams:
    """The RankParams of `score`'s flags: --preset's values with the flags that override it (the
    baselines stay literal unless a guard is asked for). The cache's blocks are set by the caller."""
    names = ("damping", "normalize", "guard", "agreement", "clipscore_weight")
    overrides = {name: getattr(args, name) for name in names}
    try:
        return RankParams.preset(
            args.preset,
            blocks=None,
            method=args.method,
            alpha=args.alpha,
            lam=args.lam,
            k=args.k,
            beta=args.beta,
            ratio=args.ratio,
            seed=args.rank_seed,
            use_learnability=not args.no_learnability,
            use_relevance=not args.no_relevance,
            rank_normalized=args.rank_normalized,
            guard_mads=args.guard_mads,
            **{name: value for name, value in overrides.items() if value is not None},
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _tracin_cache(ws: Workspace, spec: str) -> tuple[Any, float]:
    from chips_core.scoring.cache import ScoringCache

    cid, _, eta = spec.partition(":")
    try:
        cache_id, lr = int(cid), float(eta) if eta else 1.0
    except ValueError:
        raise CliError(f"--tracin-cache {spec!r}: expected CACHE_ID or CACHE_ID:ETA") from None
    row = catalog.scoring_cache(ws, cache_id)
    if row is None or row[1] != "done":
        raise CliError(f"--tracin-cache: no finished scoring cache {cache_id}")
    return ScoringCache.load(row[0]), lr


def _score_table(ws: Workspace, pool: str, result: Any) -> Any:
    """The ranking joined with the pool's pairs: pair_id, filepath, caption, label and every component."""
    from chips_core.curation.selection import rank_frame, resolve_pool

    frame = rank_frame(result)
    pool_id = resolve_pool(ws, pool)
    pairs = catalog.pairs_frame(ws, pool_id)
    table = frame.merge(pairs, on="pair_id", how="left")
    first = [
        "pair_id",
        "filepath",
        "caption",
        "label",
        "alignment",
        "learnability",
        "relevance",
        "agreement",
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
