"""The audit trail: who did what, when, under which score run and with which parameters.

Decisions are their own record (the append-only `decisions` table carries the user's subject and e-mail
and the score run); selections, exports, training launches, cancelled jobs, role grants and refused
attempts are rows of `audit_log`. `activity` shows both as one trail, newest first.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from chips_core.spreadsheet import neutralise
from chips_core.team.identity import Actor
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace

KINDS = ("decision", "selection", "export", "train", "job", "grant", "refused")


def record(
    ws: Workspace,
    actor: Actor,
    kind: str,
    action: str | None = None,
    *,
    outcome: str = "ok",
    pool_id: int | None = None,
    pair_id: int | None = None,
    object_id: int | None = None,
    score_run_id: int | None = None,
    params: dict[str, Any] | None = None,
    detail: str | None = None,
) -> int:
    """Append one event to the trail; returns its id."""
    with ws.connect() as con:
        event_id = ws.next_id(con)
        catalog.insert_audit(
            con,
            event_id,
            subject=actor.subject,
            email=actor.email,
            kind=kind,
            action=action,
            outcome=outcome,
            pool_id=pool_id,
            pair_id=pair_id,
            object_id=object_id,
            score_run_id=score_run_id,
            params=None if params is None else json.dumps(params, default=str),
            detail=detail,
        )
    return event_id


def activity(
    ws: Workspace,
    *,
    users: Sequence[str] = (),
    pair_id: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    kinds: Sequence[str] = (),
    pool_id: int | None = None,
) -> pd.DataFrame:
    """The trail, newest first: created_at, user, subject, email, kind, action, outcome, pool_id, pair_id,
    object_id (decision / selection / export / CPT run id), score_run_id, params (JSON text: the score
    run's parameters for a decision), detail (a decision's note, a refusal's reason)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown activity kind(s) {', '.join(unknown)}; use {', '.join(KINDS)}")
    ws.check()
    return catalog.activity_rows(
        ws, users=users, pair_id=pair_id, since=since, until=until, kinds=kinds, pool_id=pool_id
    )


def activity_users(ws: Workspace) -> list[str]:
    """Everyone in the trail (e-mail, else subject, else the author name of older decisions)."""
    ws.check()
    return catalog.activity_users(ws)


def activity_csv(ws: Workspace, **filters: Any) -> bytes:
    """The filtered trail as UTF-8 CSV; cells that a spreadsheet would run as formulas get a leading '."""
    df = activity(ws, **filters)
    for col in df.columns:
        if not pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_datetime64_any_dtype(df[col]):
            df[col] = df[col].map(lambda v: neutralise(v) if isinstance(v, str) else v)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def changed_by_others(ws: Workspace, pool_id: int, actor: Actor, after_decision_id: int) -> pd.DataFrame:
    """Pairs whose state `actor` set and another user changed since decision `after_decision_id`:
    pair_id, yours, theirs, by (e-mail or name of who changed it), decided_at, decision_id. Empty for the
    local user (single-user mode)."""
    if not actor.signed_in:
        return pd.DataFrame(columns=["pair_id", "yours", "theirs", "by", "decided_at", "decision_id"])
    return catalog.changed_by_others(ws, pool_id, actor.subject, after_decision_id)


def latest_decision_id(ws: Workspace, pool_id: int) -> int:
    """The newest decision id of a pool (0 without decisions): a watermark for `changed_by_others`."""
    return catalog.latest_decision_id(ws, pool_id)
