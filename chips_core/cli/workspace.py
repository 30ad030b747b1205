"""`chips init | status | jobs | demo`: a workspace, its background jobs, and the bundled demo workspace."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chips_core.cli.common import (
    open_workspace,
    register,
    say,
)
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace


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

    ws = open_workspace(args.ws)
    jobs.list_jobs(ws)  # records dead jobs as failed before they are shown
    with ws.connect(read_only=True) as con:
        pools = catalog.pools_overview(con)
        cols = [
            "pool_id",
            "name",
            "kind",
            "format",
            "status",
            "pairs",
            "rejects",
            "source",
            "encoding",
            "error",
        ]
        out: dict[str, Any] = {"pools": pools[cols], **catalog.status_overview(con)}
        dirs = catalog.running_feature_run_dirs(con)
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


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("--cancel", type=int, default=None, metavar="JOB_ID", help="cancel this job")
    p.add_argument("--log", type=int, default=None, metavar="JOB_ID", help="print the end of this job's log")


def _run_jobs(args: argparse.Namespace) -> int:
    from chips_core.workspace import jobs

    ws = open_workspace(args.ws)
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


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ws",
        metavar="WS",
        nargs="?",
        default=None,
        help="folder of the demo workspace (default: where the dashboard opens it, env CHIPS_DEMO_WS or "
        "~/.cache/chips-studio/demo-<bundle hash>)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from chips_core import demo
    from chips_core.workspace.progress import progress_bar

    path = demo.default_path() if args.ws is None else args.ws
    with progress_bar("demo", unit="step") as bar:
        ws = demo.build_demo_workspace(path, progress=bar)
    say(f"demo workspace ready at {ws.root}")
    return 0


register(
    "demo",
    "build the bundled demo workspace from data/demo (idempotent; what the dashboard opens by default)",
    _add_demo,
    _run_demo,
)
