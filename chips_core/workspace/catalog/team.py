"""Team curation: members and their roles, the audit log, which decisions a selection applied, and the
activity trail (decisions and audit events in one table)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from chips_core.workspace.catalog._db import Con, Db, first, reading

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "activity_rows",
    "applied_decisions",
    "activity_users",
    "changed_by_others",
    "insert_audit",
    "insert_member",
    "insert_selection_decisions",
    "latest_decision_id",
    "member_role",
    "members",
]


def insert_member(con: Con, member_row: int, member: str, role: str, granted_by: str) -> None:
    """Append a role grant (the latest row per member is the role in force)."""
    con.execute(
        "INSERT INTO members (member_row, member, role, granted_by) VALUES (?, ?, ?, ?)",
        [member_row, member, role, granted_by],
    )


def members(db: Db) -> pd.DataFrame:
    """The role in force per member: member, role, granted_by, granted_at; sorted by member."""
    with reading(db) as con:
        return con.execute(
            "SELECT member, arg_max(role, member_row) AS role, arg_max(granted_by, member_row) AS granted_by,"
            " max(granted_at) AS granted_at FROM members GROUP BY member ORDER BY member"
        ).df()


def member_role(db: Db, keys: Sequence[str]) -> str | None:
    """The role in force of the first of `keys` (e.g. subject, then e-mail) that has one, else None."""
    keys = [k for k in keys if k]
    if not keys:
        return None
    with reading(db) as con:
        rows = con.execute(
            "SELECT member, arg_max(role, member_row) FROM members WHERE member IN (SELECT unnest(?)) "
            "GROUP BY member",
            [keys],
        ).fetchall()
    found = dict(rows)
    return next((str(found[k]) for k in keys if k in found), None)


def insert_audit(
    con: Con,
    event_id: int,
    *,
    subject: str,
    email: str | None,
    kind: str,
    action: str | None,
    outcome: str,
    pool_id: int | None = None,
    pair_id: int | None = None,
    object_id: int | None = None,
    score_run_id: int | None = None,
    params: str | None = None,
    detail: str | None = None,
) -> None:
    """Append one audit event (`params`: JSON text)."""
    con.execute(
        "INSERT INTO audit_log (event_id, subject, email, kind, action, outcome, pool_id, pair_id, "
        "object_id, score_run_id, params, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [event_id, subject, email, kind, action, outcome, pool_id, pair_id, object_id, score_run_id]
        + [params, detail],
    )


def insert_selection_decisions(con: Con, selection_id: int, decision_ids: Sequence[int]) -> None:
    """Record the decision rows a selection applied."""
    if decision_ids:
        con.execute(
            "INSERT INTO selection_decisions SELECT ?, unnest(?)",
            [int(selection_id), [int(d) for d in decision_ids]],
        )


def applied_decisions(db: Db, selection_id: int) -> pd.DataFrame:
    """The decision rows a selection applied: decision_id, pair_id, action, by (e-mail, else subject, else
    author), created_at; oldest first."""
    with reading(db) as con:
        return con.execute(
            "SELECT d.decision_id, d.pair_id, d.action, coalesce(d.email, d.subject, d.author) AS by, "
            "d.created_at FROM selection_decisions s JOIN decisions d USING (decision_id) "
            "WHERE s.selection_id = ? ORDER BY d.decision_id",
            [int(selection_id)],
        ).df()


# decisions (one row per decided pair, with the score run's parameters) and audit events, as one trail
_TRAIL = """
    SELECT d.created_at, coalesce(d.email, d.subject, d.author) AS user, d.subject, d.email,
           'decision' AS kind, d.action, 'ok' AS outcome, d.pool_id, d.pair_id, d.decision_id AS object_id,
           d.score_run_id, CAST(r.params AS VARCHAR) AS params, d.note AS detail, d.decision_id AS seq
    FROM decisions d LEFT JOIN score_runs r USING (score_run_id)
    UNION ALL
    SELECT a.created_at, coalesce(a.email, a.subject), a.subject, a.email, a.kind, a.action, a.outcome,
           a.pool_id, a.pair_id, a.object_id, a.score_run_id, CAST(a.params AS VARCHAR), a.detail, a.event_id
    FROM audit_log a"""


def activity_rows(
    db: Db,
    *,
    users: Sequence[str] = (),
    pair_id: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    kinds: Sequence[str] = (),
    pool_id: int | None = None,
) -> pd.DataFrame:
    """The activity trail, newest first, filtered (all filters combine with AND): `users` match the
    e-mail, subject or (older rows) author; `since` ≤ created_at < `until`. An event about several pairs (a
    refused bulk decision) matches `pair_id` when its params list the pair."""
    where, args = ["TRUE"], []
    if users:
        where.append("(t.user IN (SELECT unnest(?)) OR t.subject IN (SELECT unnest(?)))")
        args += [list(users), list(users)]
    if pair_id is not None:
        where.append(
            "(t.pair_id = ? OR (t.kind <> 'decision' AND "
            "list_contains(CAST(json_extract(t.params, '$.pair_ids') AS BIGINT[]), ?)))"
        )
        args += [int(pair_id), int(pair_id)]
    if since is not None:
        where.append("t.created_at >= ?")
        args.append(since)
    if until is not None:
        where.append("t.created_at < ?")
        args.append(until)
    if kinds:
        where.append("t.kind IN (SELECT unnest(?))")
        args.append(list(kinds))
    if pool_id is not None:
        where.append("t.pool_id = ?")
        args.append(int(pool_id))
    with reading(db) as con:
        return con.execute(
            f"SELECT * EXCLUDE (seq) FROM ({_TRAIL}) t WHERE {' AND '.join(where)} ORDER BY t.seq DESC", args
        ).df()


def activity_users(db: Db) -> list[str]:
    """Everyone who appears in the trail, sorted."""
    with reading(db) as con:
        sql = f"SELECT DISTINCT user FROM ({_TRAIL}) t WHERE user IS NOT NULL ORDER BY 1"
        rows = con.execute(sql).fetchall()
    return [str(r[0]) for r in rows]


def latest_decision_id(db: Db, pool_id: int) -> int:
    """The newest decision id of a pool (0 when it has none)."""
    with reading(db) as con:
        sql = "SELECT coalesce(max(decision_id), 0) FROM decisions WHERE pool_id = ?"
        row = first(con.execute(sql, [int(pool_id)]))
    return int(row[0])


def changed_by_others(db: Db, pool_id: int, subject: str, after_decision_id: int) -> pd.DataFrame:
    """Pairs whose include/exclude/clear state `subject` set last and another user then changed to something
    else, with a change newer than `after_decision_id`: pair_id, yours, theirs, by, decided_at,
    decision_id."""
    with reading(db) as con:
        return con.execute(
            """
            WITH d AS (SELECT * FROM decisions
                       WHERE pool_id = ? AND action IN ('include', 'exclude', 'clear')),
            mine AS (SELECT pair_id, max(decision_id) AS mine_id, arg_max(action, decision_id) AS yours
                     FROM d WHERE subject = ? GROUP BY pair_id),
            latest AS (SELECT pair_id, max(decision_id) AS decision_id,
                              arg_max(action, decision_id) AS theirs,
                              arg_max(coalesce(email, subject, author), decision_id) AS by,
                              arg_max(created_at, decision_id) AS decided_at,
                              arg_max_null(subject, decision_id) AS their_subject
                       FROM d GROUP BY pair_id)
            SELECT l.pair_id, m.yours, l.theirs, l.by, l.decided_at, l.decision_id
            FROM mine m JOIN latest l USING (pair_id)
            WHERE l.decision_id > m.mine_id AND l.decision_id > ? AND l.theirs <> m.yours
                  AND coalesce(l.their_subject, '') <> ?
            ORDER BY l.decision_id
            """,
            [int(pool_id), subject, int(after_decision_id), subject],
        ).df()
