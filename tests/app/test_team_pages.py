"""The dashboard for a curation team under streamlit.testing.v1.AppTest, on a tiny real workspace: the
single-user default (no identity provider: no sign-in, the local user is the lead, the Activity page lists
what was done), and signed-in users (AppTest's `user` stands in for st.user; the [auth] section for the
secrets file) whose roles chips_core enforces."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from chips_core.curation import selection
from chips_core.team import audit, roles
from chips_core.team.identity import local_actor
from chips_core.workspace import catalog, store
from tests.app.workspace_build import POOL

pytestmark = pytest.mark.app

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
AUTH = {  # what .streamlit/secrets.toml holds when an identity provider is configured
    "auth": {
        "redirect_uri": "http://127.0.0.1:8501/oauth2callback",
        "cookie_secret": "x" * 64,
        "client_id": "chips-studio",
        "client_secret": "secret",
        "server_metadata_url": "http://127.0.0.1:1/.well-known/openid-configuration",
    }
}
VERA = {"is_logged_in": True, "sub": "vera-1", "email": "Vera@Hospital.example", "name": "Vera Viewer"}
CURT = {"is_logged_in": True, "sub": "curt-2", "email": "curt@hospital.example", "name": "Curt Curator"}


def _app(page: str | None = None, user: dict | None = None) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=180)
    if user is not None:
        at.secrets, at.user = AUTH, user
    at.run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _sidebar_text(at: AppTest) -> str:
    return " ".join(m.value for m in at.sidebar.markdown)


def _table(at: AppTest, column: str) -> pd.DataFrame:
    """The first dataframe on the page with `column` (the activity trail: 'kind'; the members: 'member')."""
    return next(df.value for df in at.dataframe if column in df.value.columns)


def _decision_buttons(at: AppTest, prefix: str) -> list:
    return [b for b in at.button if b.key and b.key.startswith(prefix)]


def test_single_user_decides_and_the_activity_page_lists_it(tiny_workspace):
    at = _app("browse")
    _ok(at)
    assert "Signed in" not in _sidebar_text(at)  # no provider: no sign-in, no sign-out
    button = _decision_buttons(at, "top-exc-")[0]
    pid = int(button.key.removeprefix("top-exc-"))
    assert button.help.startswith("Exclude:")  # the usual help: the local user is the lead
    button.click().run()
    _ok(at)

    at.switch_page("views/activity.py").run()
    _ok(at)
    assert at.title[0].value == "Activity"
    trail = _table(at, "kind")
    row = trail.iloc[0]  # the decision, by the local user, under the ranking on screen
    assert (row["kind"], row["action"], row["pair_id"], row["subject"]) == (
        "decision",
        "exclude",
        pid,
        local_actor().subject,
    )
    run = json.loads(row["params"])
    assert row["score_run_id"] > 0 and run["method"] == "chips" and run["ratio"] == pytest.approx(0.3)
    at.text_input(key="act_pair").input(str(pid + 1)).run()
    assert _table(at, "kind").empty
    at.text_input(key="act_pair").input(str(pid)).run()
    at.multiselect(key="act_kinds").set_value(["decision"]).run()
    assert len(_table(at, "kind")) == 1
    today = dt.date.today()
    at.date_input(key="act_days").set_value(
        (today - dt.timedelta(days=3), today - dt.timedelta(days=2))
    ).run()
    assert _table(at, "kind").empty
    at.date_input(key="act_days").set_value(
        (today - dt.timedelta(days=1), today + dt.timedelta(days=1))
    ).run()
    assert len(_table(at, "kind")) == 1

    at.text_input(key="grant_member").input("Curt@Hospital.example")  # the local user is the lead
    at.selectbox(key="grant_role").set_value("curator")
    at.button(key="FormSubmitter:grant_form-Grant").click().run()
    _ok(at)
    assert "curt@hospital.example is now a curator" in at.success[0].value.lower()
    ws = store.Workspace(tiny_workspace)
    assert roles.members(ws).set_index("member").loc["curt@hospital.example", "role"] == "curator"
    assert _table(at, "member")["member"].tolist() == ["curt@hospital.example"]
    csv = audit.activity_csv(ws)
    assert set(pd.read_csv(io.BytesIO(csv))["kind"]) == {"decision", "grant"}


def test_sign_in_screen_until_signed_in(tiny_workspace):
    at = _app(user={"is_logged_in": False})
    _ok(at)
    assert [t.value for t in at.title] == ["CHIPS Studio"]
    assert at.button(key="sign_in_default").label == "Sign in"
    assert not _decision_buttons(at, "top-")  # nothing of the workspace before signing in


def test_a_viewer_is_refused_by_the_workspace_and_a_curator_decides(tiny_workspace):
    ws = store.Workspace(tiny_workspace)
    at = _app("browse", user=VERA)  # signed in, never granted a role: a viewer
    _ok(at)
    assert "Signed in as **Vera Viewer**" in _sidebar_text(at) and "viewer" in _sidebar_text(at)
    button = _decision_buttons(at, "top-inc-")[0]
    pid = int(button.key.removeprefix("top-inc-"))
    assert "You are a viewer" in button.help
    button.click().run()
    assert "Vera Viewer is a viewer in this workspace and cannot record decisions" in at.error[0].value
    assert selection.current_decisions(ws, POOL).empty  # nothing recorded ...
    refused = audit.activity(ws, kinds=["refused"])  # ... but the attempt is in the trail
    assert refused[["email", "pair_id", "outcome"]].values.tolist() == [
        ["vera@hospital.example", pid, "refused"]
    ]
    at.switch_page("views/export.py").run()
    save = at.button(key="FormSubmitter:save_selection-Save selection")
    assert save.disabled and "lead role" in save.help  # lead-only buttons are disabled, with the reason
    at.switch_page("views/activity.py").run()
    assert not at.get("form")  # no Members form for a viewer

    roles.grant(ws, local_actor(), VERA["email"], "curator")  # a lead grants her the curator role
    at.switch_page("views/browse.py").run()
    at.button(key=f"top-inc-{pid}").click().run()
    _ok(at)
    row = selection.current_decisions(ws, POOL).set_index("pair_id").loc[pid]
    assert (row["state"], row["email"], row["author"]) == ("include", "vera@hospital.example", "Vera Viewer")


def test_signed_in_users_stay_in_the_servers_workspace(tiny_workspace, tmp_path):
    """With sign-in, the workspace is the server's CHIPS_WORKSPACE: no folder box, no Open/Create, and a
    folder put into the session is ignored (a signed-in user cannot create or read other folders)."""
    at = _app("workspace", user=CURT)
    _ok(at)
    assert [t.key for t in at.sidebar.text_input] == []
    assert "ws_new_path" not in [t.key for t in at.text_input]
    assert "team's shared workspace" in " ".join(c.value for c in at.caption)
    other = tmp_path / "elsewhere"
    at.session_state["ws_path"] = str(other)
    at.run()
    _ok(at)
    assert f"`{tiny_workspace}`" in " ".join(m.value for m in at.markdown) and not other.exists()
    single = _app("workspace")  # single-user mode keeps the choice
    assert "ws_new_path" in [t.key for t in single.text_input] and single.sidebar.text_input


def test_a_curator_sees_what_another_changed_on_the_next_rerun(tiny_workspace):
    ws = store.Workspace(tiny_workspace)
    for user in (VERA, CURT):
        roles.grant(ws, local_actor(), user["email"], "curator")
    vera, curt = _app("browse", user=VERA), _app("browse", user=CURT)
    pid = int(_decision_buttons(vera, "top-inc-")[0].key.removeprefix("top-inc-"))
    vera.button(key=f"top-inc-{pid}").click().run()
    curt.run()  # Curt's page after Vera's decision: nothing of his was changed
    assert not curt.warning
    curt.button(key=f"top-exc-{pid}").click().run()
    _ok(curt)
    vera.run()  # Vera's next rerun
    warning = next(w.value for w in vera.warning if "Changed by others" in w.value)
    assert f"pair {pid}: you set **include**; **curt@hospital.example** changed it to **exclude**" in warning
    vera.run()
    assert any("Changed by others" in w.value for w in vera.warning)  # kept until dismissed
    vera.button(key="changes_dismiss").click().run()
    assert not any("Changed by others" in w.value for w in vera.warning)
    vera.button(key=f"top-why-{pid}").click().run()  # the detail view says who decided, and when
    assert any("**Decision:** exclude · by Curt Curator" in m.value for m in vera.markdown)


def test_a_change_committed_after_a_newer_one_is_still_shown(tiny_workspace):
    """Two sessions deciding at once: Curt's decision id is taken before Vera's newer decision commits,
    and his row commits after her page has looked. Her next rerun still shows it, once."""
    ws = store.Workspace(tiny_workspace)
    for user in (VERA, CURT):
        roles.grant(ws, local_actor(), user["email"], "curator")
    vera = _app("browse", user=VERA)
    first, second = (int(b.key.removeprefix("top-inc-")) for b in _decision_buttons(vera, "top-inc-")[:2])
    vera.button(key=f"top-inc-{first}").click().run()
    early_id = ws.new_id()  # Curt's session takes its id ...
    vera.button(key=f"top-inc-{second}").click().run()
    vera.run()  # ... Vera's page looks past it ...
    pool_id = catalog.pool_id(ws, POOL)
    row = pd.DataFrame(
        {"decision_id": [early_id], "pool_id": [pool_id], "pair_id": [first], "action": ["exclude"],
         "note": [None], "author": ["Curt Curator"], "score_run_id": [None], "subject": [CURT["sub"]],
         "email": [CURT["email"]]}
    )  # fmt: skip
    with ws.connect() as con:  # ... and then his row commits
        catalog.insert_decisions(con, row)
    vera.run()
    warning = next(w.value for w in vera.warning if "Changed by others" in w.value)
    expected = f"pair {first}: you set **include**; **curt@hospital.example** changed it to **exclude**"
    assert expected in warning
    vera.button(key="changes_dismiss").click().run()
    vera.run()
    assert not any("Changed by others" in w.value for w in vera.warning)  # reported once
