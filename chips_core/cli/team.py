"""`chips team | activity`: who may do what in a workspace, and the trail of what everyone did.

The CLI acts as the local user, who owns the workspace files and is its lead (see chips_core.team.roles).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

import pandas as pd

from chips_core.cli.common import CliError, open_workspace, register, say
from chips_core.team import audit, roles
from chips_core.team.identity import local_actor
from chips_core.workspace.store import atomic_write_bytes


def _add_team(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument(
        "what",
        choices=("list", "grant"),
        help="list: the members and their roles; grant: give MEMBER the role ROLE",
    )
    p.add_argument("member", nargs="?", metavar="MEMBER", help="e-mail (or ID token subject) to grant a role")
    p.add_argument("role", nargs="?", choices=roles.ROLES, metavar="ROLE", help=" | ".join(roles.ROLES))


def _run_team(args: argparse.Namespace) -> int:
    ws = open_workspace(args.ws)
    if args.what == "grant":
        if not args.member or not args.role:
            raise CliError("grant needs MEMBER and ROLE, e.g. `chips team WS grant ana@hospital.org curator`")
        roles.grant(ws, local_actor(), args.member, args.role)
        say(f"{args.member}: {args.role}")
        return 0
    table = roles.members(ws)
    if table.empty:
        say("no members yet: signed-in users are viewers until a lead grants them a role")
    for r in table.itertuples():
        say(f"{r.member}\t{r.role}\tgranted by {r.granted_by} at {r.granted_at:%Y-%m-%d %H:%M}")
    return 0


def _when(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        example = "use e.g. 2026-11-30 or 2026-11-30T14:00"
        raise argparse.ArgumentTypeError(f"not a date or time: {text!r} ({example})") from None


def _add_activity(p: argparse.ArgumentParser) -> None:
    p.add_argument("ws", metavar="WS", help="workspace folder")
    p.add_argument("--user", action="append", default=[], help="only this e-mail / subject (repeatable)")
    p.add_argument("--pair", type=int, default=None, help="only events about this pair id")
    p.add_argument("--kind", action="append", default=[], choices=audit.KINDS, help="only these kinds")
    p.add_argument("--since", type=_when, default=None, help="from this time on (ISO date or date-time)")
    p.add_argument("--until", type=_when, default=None, help="before this time (ISO date or date-time)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the trail as CSV to FILE ('-': stdout)")


def _run_activity(args: argparse.Namespace) -> int:
    ws = open_workspace(args.ws)
    filters = {"users": args.user, "pair_id": args.pair, "kinds": args.kind, "since": args.since,
               "until": args.until}  # fmt: skip
    if args.csv == "-":
        sys.stdout.write(audit.activity_csv(ws, **filters).decode("utf-8"))
        return 0
    if args.csv:
        atomic_write_bytes(args.csv, audit.activity_csv(ws, **filters))
        say(f"wrote {args.csv}")
        return 0
    trail = audit.activity(ws, **filters)
    if trail.empty:
        say("no activity matches")
    for r in trail.itertuples():
        pair = "" if pd.isna(r.pair_id) else f" pair {int(r.pair_id)}"
        refused = " (REFUSED)" if r.outcome == "refused" else ""
        say(f"{r.created_at:%Y-%m-%d %H:%M:%S}  {r.user}  {r.kind} {r.action or ''}{pair}{refused}")
    return 0


register("team", "list the workspace's members and their roles, or grant a role", _add_team, _run_team)
register("activity", "the audit trail: who decided, selected, exported or trained what, and when",
         _add_activity, _run_activity)  # fmt: skip
