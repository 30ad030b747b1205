"""Roles per workspace and the checks every write goes through.

viewer < curator < lead: a viewer browses; a curator also records decisions and notes; a lead also saves
selections, exports, launches training and workspace jobs, and grants roles. Roles are granted to an
e-mail (or an ID token subject) and stored in the workspace (`members`, append-only). A signed-in user
without a grant is a viewer. The local user (no identity provider: single-user mode, or the CLI on the
server, which can read the workspace files anyway) is the lead. A refused attempt raises `AccessDenied`
and is written to the audit trail.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from chips_core.errors import ChipsError
from chips_core.team import audit
from chips_core.team.identity import Actor
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace

ROLES = ("viewer", "curator", "lead")
ACTION_ROLES = {
    "decide": "curator",
    "select": "lead",
    "export": "lead",
    "train": "lead",
    "manage": "lead",
    "grant": "lead",
}
ACTION_WORDS = {
    "decide": "record decisions",
    "select": "save selections",
    "export": "export selections",
    "train": "launch training",
    "manage": "add data or run workspace jobs",
    "grant": "change roles",
}


class AccessDenied(ChipsError):  # noqa: N818 (named like Django's PermissionDenied)
    """A write the user's role does not allow; the message says who, what and which role it needs."""


def role_of(ws: Workspace, actor: Actor) -> str:
    """The role of `actor` in `ws`: the local user is the lead; a signed-in user has their grant (by
    subject, else e-mail), else 'viewer'."""
    if not actor.signed_in:
        return "lead"
    return catalog.member_role(ws, actor.keys) or "viewer"


def can(ws: Workspace, actor: Actor, action: str) -> bool:
    """Whether `actor`'s role allows `action` (one of ACTION_ROLES)."""
    return ROLES.index(role_of(ws, actor)) >= ROLES.index(_needed(action))


def require(
    ws: Workspace,
    actor: Actor,
    action: str,
    *,
    pool_id: int | None = None,
    pair_ids: Iterable[int] = (),
    detail: str | None = None,
) -> None:
    """Return when `actor` may do `action`; otherwise record the refusal and raise AccessDenied."""
    needed = _needed(action)
    if not actor.signed_in:  # single-user mode stays as fast as before: no read
        return
    role = role_of(ws, actor)
    if ROLES.index(role) >= ROLES.index(needed):
        return
    pairs = [int(p) for p in pair_ids]
    message = (
        f"{actor.display} is a {role} in this workspace and cannot {ACTION_WORDS[action]}: that needs the "
        f"{needed} role. Ask a lead of the workspace to grant it."
    )
    audit.record(
        ws,
        actor,
        "refused",
        action,
        outcome="refused",
        pool_id=pool_id,
        pair_id=pairs[0] if len(pairs) == 1 else None,
        params={"pair_ids": pairs} if pairs else None,
        detail=detail or message,
    )
    raise AccessDenied(message)


def grant(ws: Workspace, by: Actor, member: str, role: str) -> None:
    """Give `member` (an e-mail, or an ID token subject) `role` in `ws`; `by` must be a lead. Audited."""
    if role not in ROLES:
        raise ChipsError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    member = member.strip()
    if not member:
        raise ChipsError("a role needs a member: an e-mail address or an ID token subject")
    member = member.lower() if "@" in member else member
    require(ws, by, "grant", detail=f"grant {role} to {member}")
    with ws.connect() as con:
        catalog.insert_member(con, ws.next_id(con), member, role, by.email or by.subject)
    audit.record(ws, by, "grant", role, params={"member": member, "role": role})


def members(ws: Workspace) -> pd.DataFrame:
    """The role in force per member: member, role, granted_by, granted_at."""
    ws.check()
    return catalog.members(ws)


def _needed(action: str) -> str:
    if action not in ACTION_ROLES:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTION_ROLES)}")
    return ACTION_ROLES[action]


def describe(ws: Workspace, actor: Actor) -> dict[str, Any]:
    """Who `actor` is here, for a sidebar or `chips team whoami`: display, subject, email, role, and the
    actions allowed."""
    role = role_of(ws, actor)
    allowed = [a for a, r in ACTION_ROLES.items() if ROLES.index(role) >= ROLES.index(r)]
    return {
        "display": actor.display,
        "subject": actor.subject,
        "email": actor.email,
        "role": role,
        "allowed": allowed,
    }
