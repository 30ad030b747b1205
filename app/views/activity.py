"""Activity: the workspace's audit trail (decisions, selections, exports, training launches, role grants
and refused attempts), filtered by user, pair, time and kind, newest first, and downloadable as CSV. Leads
also manage the members' roles here."""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import streamlit as st

from app import auth, context
from chips_core.errors import ChipsError
from chips_core.team import audit, roles

ws = context.workspace()

st.title("Activity")
st.caption(
    "Who did what and when in this workspace: every decision (with the score run and its parameters), "
    "saved selection, export, training launch, role change and refused attempt. Nothing here is ever "
    "overwritten: a reversed decision is a new row."
)

left, mid, right = st.columns([2, 1, 2])
users = left.multiselect("User", audit.activity_users(ws), key="act_users", placeholder="everyone")
pair_text = mid.text_input("Pair id", key="act_pair", help="One pair's id (as in the Browse page's details)")
kinds = right.multiselect("Kind", list(audit.KINDS), key="act_kinds", placeholder="every kind")
days = st.date_input("Between (dates, inclusive)", value=(), key="act_days", format="YYYY-MM-DD")
filters: dict[str, Any] = {"users": users, "kinds": kinds}
if pair_text.strip():
    try:
        filters["pair_id"] = int(pair_text.strip())  # 64-bit ids: a text box, not a number input
    except ValueError:
        st.warning(f"{pair_text.strip()!r} is not a pair id (a whole number); the pair filter is ignored.")
if len(days) >= 1:
    filters["since"] = dt.datetime.combine(days[0], dt.time.min)
    filters["until"] = dt.datetime.combine(days[-1] + dt.timedelta(days=1), dt.time.min)

trail = audit.activity(ws, **filters)
st.dataframe(trail, hide_index=True, key="activity_table")
st.download_button(
    f"Download these {len(trail):,} rows as CSV",
    data=functools.partial(audit.activity_csv, ws, **filters),  # built on click
    file_name="chips-activity.csv",
    mime="text/csv",
    icon=":material/download:",
    key="activity_csv",
)

st.subheader("Members")
refused = auth.refusal(ws, "grant")
if refused:
    st.caption(
        f"Roles: viewer (browse), curator (decisions, notes), lead (selections, export, training). {refused}"
    )
else:
    if "grant_flash" in st.session_state:
        st.success(st.session_state.pop("grant_flash"))
    st.dataframe(roles.members(ws), hide_index=True, key="members_table")
    with st.form("grant_form", border=False):
        c1, c2 = st.columns([3, 1])
        member = c1.text_input("E-mail (or ID token subject)", key="grant_member")
        role = c2.selectbox("Role", list(roles.ROLES), index=1, key="grant_role")
        if st.form_submit_button("Grant"):
            try:
                roles.grant(ws, auth.actor(), member, role)
            except ChipsError as exc:  # AccessDenied, an unknown role or an empty member
                st.error(str(exc))
            else:
                st.session_state["grant_flash"] = f"{member.strip()} is now a {role}."
                st.rerun()
