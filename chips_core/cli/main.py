"""`chips`: build the parser from every command module and run one command.

`run` raises ChipsError (and OSError/ValueError from the standard library) for bad input: `main` prints ONE
line on stderr and exits 1; any other exception is an internal error (exit 2; CHIPS_DEBUG=1 prints the
traceback)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

# every command module registers its commands when imported (the order is the order of `chips --help`)
from chips_core.cli import curation, pools, scoring, team, training, workspace
from chips_core.cli.common import COMMANDS
from chips_core.errors import ChipsError
from chips_core.workspace import progress
from chips_core.workspace.store import Workspace

GROUPS = (workspace, pools, scoring, curation, training, team)  # the order of `chips --help`


def build_parser() -> argparse.ArgumentParser:
    """The full `chips` parser: one subcommand per registered command."""
    parser = argparse.ArgumentParser(
        prog="chips",
        description="CHIPS Studio: score, curate and export image-text pairs for CLIP continual "
        "pre-training.",
        epilog="Every command takes the workspace folder first; see the README's command line reference.",
    )
    parser.add_argument("--job-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job-ws", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    order = {group.__name__: i for i, group in enumerate(GROUPS)}
    for cmd in sorted(COMMANDS.values(), key=lambda c: order.get(c.run.__module__, len(order))):
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run `chips ARGV`; returns the exit status (0 ok, 1 bad input, 2 internal error, 130 cancelled)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    reporter = None
    if args.job_id is not None:
        from chips_core.workspace import jobs

        reporter = jobs.JobReporter(Workspace(args.job_ws), args.job_id)
        reporter.start()
        progress.set_job_reporter(reporter)
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
        user = isinstance(exc, ChipsError | ValueError | OSError)
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
