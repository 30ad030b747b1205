"""The `chips` command line: one subcommand per pipeline stage, each a thin call into the library.

A subcommand is a `Command`: a name, a one-line help, `add_arguments(parser)` and `run(args) -> int`.
Built-in commands are registered below. Other modules add theirs without editing this file by defining

    def register_cli(register):            # in a module listed in EXTENSION_MODULES
        register("train", "continually pre-train on a selection", add_train_arguments, run_train)

`run` raises the library's user-facing errors (WorkspaceError and its subclasses, ValueError,
FileNotFoundError...) for bad input: `main` turns them into ONE line on stderr and exit status 1; any other
exception is an internal error (exit 2; CHIPS_DEBUG=1 prints the traceback). `progress_bar(desc)` gives a
tqdm bar (pairs/s, ETA) that also feeds the background-job progress when running under `chips_core.jobs`.
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
from typing import Any

from chips_core.store import Workspace, WorkspaceError

EXTENSION_MODULES = ("chips_core.cpt", "chips_core.evaluate", "chips_core.experiment")


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


# --- helpers shared by commands -------------------------------------------------------------------------


def workspace(path: str, must_exist: bool = True) -> Workspace:
    """The workspace at `path`; a CliError names it when it is not initialised."""
    ws = Workspace(path)
    if must_exist:
        ws.check()
    return ws


class progress_bar:  # noqa: N801 (used like a function: `with progress_bar("featurize") as cb:`)
    """A tqdm bar usable as a library progress callback, forwarding to the job table when in a job.

    Accepts `cb(done, total)`, `cb(done, total, **extra)`, `cb(dict)` (keys done/total or step/...) and
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
            total = extra.pop("total", None)
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
    from chips_core import jobs

    ws = workspace(args.ws)
    queries = {
        "pools": "SELECT p.pool_id, p.name, p.kind, p.format, p.status, "
        "(SELECT count(*) FROM pairs x WHERE x.pool_id = p.pool_id) AS pairs, "
        "(SELECT count(*) FROM rejects r WHERE r.pool_id = p.pool_id) AS rejects, p.source "
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
    if args.json:
        say(json.dumps({k: v.to_dict("records") for k, v in out.items()}, default=str))
        return 0
    say(f"workspace {ws.root}")
    for title, df in out.items():
        say(f"\n{title}: {len(df)}")
        if len(df):
            say(df.to_string(index=False, max_colwidth=60))
    return 0


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


def _run_ingest(args: argparse.Namespace) -> int:
    from chips_core.ingest import ingest

    ws = workspace(args.ws)
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
        )
    say(summary.format())
    return 0


register("ingest", "read and validate a pool or eval set into the workspace", _add_ingest, _run_ingest)


# --- curation: select / decide / diff / export ----------------------------------------------------------


def _add_select(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name")
    p.add_argument("--ratio", type=float, required=True, help="fraction of the pool to keep, in (0, 1]")
    p.add_argument("--name", required=True, help="selection name (saving it again makes version + 1)")
    p.add_argument("--score-run", type=int, default=None, help="score run id (default: the pool's latest)")


def _run_select(args: argparse.Namespace) -> int:
    from chips_core import selection as sel

    ws = workspace(args.ws)
    run = args.score_run
    if run is None:
        pool_id = sel.resolve_pool(ws, args.pool)
        with ws.connect(read_only=True) as con:
            row = con.execute(
                "SELECT max(score_run_id) FROM score_runs WHERE pool_id = ?", [pool_id]
            ).fetchone()
        if row[0] is None:
            raise CliError(f"pool {args.pool!r} has no score run yet; run `chips score` first")
        run = int(row[0])
    sid = sel.save_selection(ws, args.pool, run, args.ratio, args.name)
    info = sel.get_selection(ws, sid)
    dec = info.params["decisions"]
    say(
        f"selection {info.name} v{info.version} (id {sid}): {info.n_selected} of "
        f"{info.params['n_ranked']} pairs "
        f"from score run {run} ({info.params['score_run']['method']}); decisions applied: "
        f"{len(dec['include'])} included, {len(dec['exclude'])} excluded"
    )
    return 0


def _add_decide(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("pool", metavar="POOL", help="pool name")
    p.add_argument("pair_id", metavar="PAIR_ID", type=int, help="the pair's id (see `chips score --out`)")
    p.add_argument("action", metavar="ACTION", choices=["include", "exclude", "clear", "note"],
                   help="include | exclude | clear | note")  # fmt: skip
    p.add_argument("--note", default=None, help="free-text note kept with the decision")
    p.add_argument("--author", default=None, help="who decides (default: $CHIPS_AUTHOR or the login name)")
    p.add_argument("--score-run", type=int, default=None, help="score run the decision was made on")


def _run_decide(args: argparse.Namespace) -> int:
    from chips_core import selection as sel

    ws = workspace(args.ws)
    did = sel.record_decision(
        ws, args.pool, args.pair_id, args.action, args.note, args.author, args.score_run
    )
    say(f"decision {did}: {args.action} pair {args.pair_id} in pool {args.pool}")
    return 0


def _add_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("a", metavar="SEL_A", help="selection id, name (latest version) or name@version")
    p.add_argument("b", metavar="SEL_B", help="selection id, name (latest version) or name@version")
    p.add_argument("--list", action="store_true", help="also print the pair ids that differ")


def _run_diff(args: argparse.Namespace) -> int:
    from chips_core import selection as sel

    d = sel.diff_selections(workspace(args.ws), _sel_ref(args.a), _sel_ref(args.b))
    say(d.summary())
    if args.list:
        for label, ids in (("only in first", d.only_a), ("only in second", d.only_b)):
            say(f"{label}: " + " ".join(str(int(x)) for x in ids))
    return 0


def _sel_ref(text: str) -> str | int:
    return int(text) if text.lstrip("-").isdigit() else text


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("selection", metavar="SEL", help="selection id, name (latest version) or name@version")
    p.add_argument("--format", dest="fmt", default="csv", choices=["csv", "safe-csv", "parquet", "ids"],
                   help="csv: open_clip_train-ready; safe-csv: for spreadsheets; "
                   "parquet: all score components; ids: .npy of pair ids")  # fmt: skip
    p.add_argument("--out", default=None, help="output file or folder (default: WS/exports/NAME-vN.EXT)")


def _run_export(args: argparse.Namespace) -> int:
    from chips_core.export import export_selection

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


register("select", "save the top RATIO of the latest scores as a named selection", _add_select, _run_select)
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
    from chips_core import jobs

    ws = workspace(args.ws)
    if args.cancel is not None:
        info = jobs.cancel(ws, args.cancel)
        say(f"job {info.job_id}: {info.status}")
        return 0
    if args.log is not None:
        sys.stdout.write(jobs.read_log(ws, args.log))
        return 0
    for j in jobs.list_jobs(ws):
        pct = "" if j.progress is None else f"{100 * j.progress:5.1f}%"
        say(f"{j.job_id:>6}  {j.kind:<10} {j.status:<9} {pct:>6}  {j.message or ''}")
    return 0


register("jobs", "list background jobs, show a log, or cancel one", _add_jobs, _run_jobs)


# --- main -----------------------------------------------------------------------------------------------


def _load_extensions() -> None:
    for name in EXTENSION_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        hook = getattr(importlib.import_module(name), "register_cli", None)
        if callable(hook):
            hook(register)


def build_parser(load_extensions: bool = True) -> argparse.ArgumentParser:
    """The full `chips` parser (extension commands included unless `load_extensions` is False)."""
    if load_extensions:
        _load_extensions()
    parser = argparse.ArgumentParser(
        prog="chips",
        description="CHIPS Studio: score, curate and export image-text pairs for CLIP continual "
        "pre-training.",
        epilog="Every command takes the workspace folder first; see docs/CLI.md.",
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
    args = parser.parse_args(argv)
    reporter = None
    if args.job_id is not None:
        from chips_core import jobs

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
        from chips_core.jobs import JobCancelled

        if isinstance(exc, JobCancelled):
            print(f"{prog}: cancelled", file=sys.stderr)
            _end(reporter, "cancelled", "cancelled by the user")
            return 130
        if isinstance(exc, SystemExit):
            raise
        user = isinstance(
            exc, WorkspaceError | ValueError | FileNotFoundError | PermissionError | NotADirectoryError
        )
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
