"""Who is using the dashboard: a user signed in through the identity provider of `.streamlit/secrets.toml`
(Streamlit's OpenID Connect support: st.login / st.user / st.logout), or, with no provider configured, the
local user of single-user mode (the lead, as before: no sign-in, no extra work per rerun).

The role checks that count are in chips_core (chips_core.team.roles): here the sidebar says who is signed
in, and write buttons are disabled, with the reason, for a role that may not use them.
"""

from __future__ import annotations

from collections.abc import Mapping

import streamlit as st

from chips_core.team import roles
from chips_core.team.identity import Actor, actor_from_claims, local_actor
from chips_core.workspace import store


def provider_configured() -> bool:
    """Whether the secrets file has an [auth] section: then everyone signs in."""
    return st.secrets.load_if_toml_exists() and "auth" in st.secrets


def _providers() -> list[str | None]:
    """The providers to offer: None for the [auth] section's own client, else its named sub-sections."""
    section = st.secrets["auth"]
    if "client_id" in section:
        return [None]
    return [name for name, value in section.items() if isinstance(value, Mapping) and "client_id" in value]


# who acts for a session of a team dashboard that is not (or no longer) signed in, e.g. a widget callback
# that runs after Sign out: a signed-in nobody, so chips_core treats it as a viewer and logs its attempts
NOBODY = Actor(subject="not-signed-in", name="a user who is not signed in", signed_in=True)


def actor() -> Actor:
    """The user this session acts as: the signed-in user; with a provider but no sign-in, `NOBODY` (never
    the local user, who is the lead); the local user in single-user mode."""
    if not provider_configured():
        return local_actor()
    if not st.user.is_logged_in:
        return NOBODY
    try:
        return actor_from_claims(st.user.to_dict())
    except ValueError:  # an ID token without a subject
        return NOBODY


def require_sign_in() -> None:
    """With a provider configured: the sign-in screen, and stop, until the user is signed in."""
    if not provider_configured() or st.user.is_logged_in:
        return
    st.title("CHIPS Studio")
    st.markdown(
        "This workspace is shared by a curation team. **Sign in** with your organisation's account; what you "
        "decide, save, export or train is recorded under your name in the workspace's activity trail."
    )
    for provider in _providers():
        label = "Sign in" if provider is None else f"Sign in with {provider}"
        if st.button(label, type="primary", icon=":material/login:", key=f"sign_in_{provider or 'default'}"):
            if provider is None:
                st.login()
            else:
                st.login(provider)
    st.stop()


def sidebar(ws: store.Workspace) -> None:
    """Who is signed in, their role in `ws`, and Sign out (nothing in single-user mode)."""
    if not provider_configured():
        return
    user = actor()
    role = roles.role_of(ws, user) if ws.db_path.exists() else "viewer"
    st.markdown(f"Signed in as **{user.display}**  \n{user.email or user.subject} · {role}")
    if st.button("Sign out", icon=":material/logout:", key="sign_out"):
        st.logout()


def refusal(ws: store.Workspace, action: str) -> str | None:
    """Why this user may not do `action` (chips_core.team.roles.ACTION_ROLES) in `ws`, for a disabled
    button's help text; None when they may (always in single-user mode)."""
    user = actor()
    if not user.signed_in:
        return None
    me = roles.describe(ws, user)  # one read of the members table
    if action in me["allowed"]:
        return None
    return (
        f"You are a {me['role']} in this workspace; to {roles.ACTION_WORDS[action]} you need the "
        f"{roles.ACTION_ROLES[action]} role (a lead grants it on the Activity page)."
    )
