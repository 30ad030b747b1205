"""`chips select | decide | diff | export | map`: selections, decisions, exports and the pool's map."""

from __future__ import annotations

import argparse
from pathlib import Path

from chips_core.cli.common import (
    FRACTION,
    CliError,
    open_workspace,
    ranged,
    register,
    say,
    sel_ref,
)
from chips_core.workspace import catalog
from chips_core.workspace.progress import progress_bar
from chips_core.workspace.store import Workspace


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
    if args.score_run is not None:
        pool = catalog.score_run_pool(ws, args.score_run)
        if pool is None:
            raise CliError(f"no score run {args.score_run} in {ws.root}")
        return pool, name
    pools = catalog.score_run_pool_names(ws)
    if len(pools) == 1:
        return pools[0], name
    if not pools:
        raise CliError("no pool has a score run yet; run `chips score` first")
    raise CliError(f"several pools have score runs ({', '.join(pools)}); choose one with --pool")


def _run_select(args: argparse.Namespace) -> int:
    from chips_core.curation import selection as sel

    ws = open_workspace(args.ws)
    pool, name = _select_target(ws, args)
    run = args.score_run
    if run is None:
        pool_id = sel.resolve_pool(ws, pool)
        run = catalog.latest_score_run(ws, pool_id)
        if run is None:
            raise CliError(f"pool {pool!r} has no score run yet; run `chips score` first")
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

    ws = open_workspace(args.ws)
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

    d = sel.diff_selections(open_workspace(args.ws), sel_ref(args.a), sel_ref(args.b))
    say(d.summary())
    if args.list:
        for label, ids in (("only in first", d.only_a), ("only in second", d.only_b)):
            say(f"{label}: " + " ".join(str(int(x)) for x in ids))
    return 0


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

    ws = open_workspace(args.ws)
    with progress_bar("materialise images", unit="image") as bar:
        info = export_selection(ws, sel_ref(args.selection), args.fmt, args.out, progress=bar)
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


def _add_map(p: argparse.ArgumentParser) -> None:
    from chips_core.curation import maps

    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default=None,
        help="map the pool's features of this model (open_clip name, NAME:PRETRAINED, model id or checkpoint "
        "file; default: the model the pool was first featurized with)",
    )
    which.add_argument("--model-id", type=int, default=None, help="the model by its id in the workspace")
    which.add_argument("--run", type=int, default=None, help="the feature run by its id")
    p.add_argument("--seed", type=int, default=0, help="UMAP seed and sample seed (default 0)")
    p.add_argument(
        "--max-points",
        type=ranged(int, 4),
        default=maps.MAX_POINTS,
        help=f"pairs mapped when the run is sampled (default {maps.MAX_POINTS:,})",
    )
    p.add_argument(
        "--full-threshold",
        type=ranged(int, 0),
        default=maps.FULL_THRESHOLD,
        help="runs up to this many pairs are mapped whole, larger ones as a sample "
        f"(default {maps.FULL_THRESHOLD:,})",
    )
    p.add_argument(
        "--n-neighbors", type=ranged(int, 2), default=15, help="UMAP neighbourhood size (default 15)"
    )
    p.add_argument("--force", action="store_true", help="compute again even when the map is cached")


def _run_map(args: argparse.Namespace) -> int:
    from chips_core.curation import maps
    from chips_core.curation.selection import resolve_pool
    from chips_core.engines.pipeline import check_name, pool_feature_run
    from chips_core.features.featurize import FeatureStore

    ws = open_workspace(args.ws)
    if args.run is None:
        run_id = pool_feature_run(ws, args.pool, args.model_id, args.model)
    else:
        check_name(ws, args.pool, "pool")
        run_id = args.run
    source = FeatureStore(ws, run_id)
    if source.pool_id != resolve_pool(ws, args.pool):
        raise CliError(f"feature run {run_id} is not a feature run of pool {args.pool!r}")
    options = {
        "seed": args.seed,
        "max_points": args.max_points,
        "full_threshold": args.full_threshold,
        "n_neighbors": args.n_neighbors,
    }
    cached = None if args.force else maps.current_map(ws, run_id, source)
    with progress_bar("map", unit="step") as bar:
        fmap = cached or maps.compute_map(ws, run_id, source, progress=bar, **options)
    how = "cached" if cached is not None else "computed"
    part = f"a sample of {len(fmap.pair_ids):,} of {fmap.n_total:,}" if fmap.sampled else f"{fmap.n_total:,}"
    say(f"map of feature run {run_id} ({args.pool}): {part} pairs, {how} in {maps.map_dir(ws, run_id)}")
    return 0


register(
    "map",
    "compute the 2-D UMAP map of a pool's image and text features (cached in the workspace)",
    _add_map,
    _run_map,
)
