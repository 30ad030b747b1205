"""A curation team on one workspace, in the real dashboard (`streamlit run` with an [auth] secrets file),
a real OpenID Connect provider on 127.0.0.1 (oauth2-mock-server) and headless Debian Chromium: two curators
sign in from two browser contexts and decide the same pair the opposite way; a viewer is refused.

Screenshots go to test-artifacts/ (git-ignored); docs/screenshots/sign-in.png and team-conflict.png are
copies of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from chips_core.curation import selection
from chips_core.team import audit, roles
from chips_core.team.identity import local_actor
from tests.app.workspace_build import POOL, build_tiny_workspace
from tests.browser.harness import ROOT, chromium_browser, streamlit_server, wait_idle
from tests.browser.identity_provider import oidc_provider, write_secrets

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"
ANN = {"sub": "ann-0001", "email": "ann@hospital.example", "name": "Ann Curator"}
BOB = {"sub": "bob-0002", "email": "bob@hospital.example", "name": "Bob Curator"}
VIC = {"sub": "vic-0003", "email": "vic@hospital.example", "name": "Vic Viewer"}


def _sign_in(browser, url: str, user: dict[str, str], screenshot: Path | None = None):
    """A new browser context (its own cookies) signed in as `user` through the provider's form."""
    page = browser.new_context(viewport={"width": 1500, "height": 1000}).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    button = page.get_by_role("button", name="Sign in")
    button.wait_for()
    if screenshot is not None:
        page.screenshot(path=str(screenshot), clip={"x": 0, "y": 0, "width": 1500, "height": 420})
    button.click()
    for claim in ("sub", "email", "name"):  # the provider's authorize step
        page.locator(f"#login_{claim}").fill(user[claim])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {user['name']}").wait_for()  # back in the dashboard, signed in
    wait_idle(page)
    return page


def _go(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()
    page.locator("h1").filter(has_text=title).first.wait_for()
    wait_idle(page)


def _top_ids(page) -> list[int]:
    """The pair ids of the top gallery's cards, best first (from their buttons' element keys)."""
    page.locator("[class*='st-key-top-inc-']").first.wait_for()
    classes = page.locator("[class*='st-key-top-inc-']").evaluate_all("els => els.map(e => e.className)")
    found = [re.search(r"st-key-top-inc-(-?\d+)", c) for c in classes]
    return list(dict.fromkeys(int(m.group(1)) for m in found if m))


def _decide(page, action: str, pair_id: int) -> None:
    page.locator(f".st-key-top-{action[:3]}-{pair_id} button").first.click()


def test_two_curators_conflict_visibly_and_a_viewer_is_refused(tmp_path: Path) -> None:
    ws = build_tiny_workspace(tmp_path / "tiny")
    for user, role in ((ANN, "curator"), (BOB, "curator"), (VIC, "viewer")):  # the local user is the lead
        roles.grant(ws, local_actor(), user["email"], role)
    with (
        oidc_provider(ARTIFACTS / "team-oidc.log") as issuer,
        streamlit_server(
            ws.root,
            ARTIFACTS / "team-streamlit.log",
            secrets=write_secrets(tmp_path / "secrets.toml", issuer),
        ) as url,
        chromium_browser() as browser,
    ):
        ann = _sign_in(browser, url, ANN, screenshot=ARTIFACTS / "sign-in.png")
        assert "curator" in ann.locator("[data-testid='stSidebar']").inner_text()
        _go(ann, "Browse")
        pid, other = _top_ids(ann)[:2]
        _decide(ann, "include", pid)
        ann.get_by_text("include: 1 pair(s) recorded").first.wait_for()
        wait_idle(ann)

        bob = _sign_in(browser, url, BOB)
        _go(bob, "Browse")
        _decide(bob, "exclude", pid)  # the later decision on the same pair
        bob.get_by_text("exclude: 1 pair(s) recorded").first.wait_for()
        wait_idle(bob)

        _decide(ann, "include", other)  # Ann's next rerun shows what Bob changed, and who he is
        warning = ann.locator("[data-testid='stAlert']").filter(has_text="Changed by others")
        warning.wait_for()
        assert re.search(
            rf"pair {pid}: you set include; {BOB['email']} changed it to exclude", warning.inner_text()
        )
        ann.screenshot(path=str(ARTIFACTS / "team-conflict.png"))

        vic = _sign_in(browser, url, VIC)
        _go(vic, "Browse")
        _decide(vic, "include", pid)
        vic.get_by_text("is a viewer in this workspace and cannot record decisions").wait_for()

        _go(ann, "Activity")
        with ann.expect_download() as download:
            ann.locator(".st-key-activity_csv button").click()
        trail = pd.read_csv(download.value.path())

    assert {ANN["email"], BOB["email"], VIC["email"]} <= set(trail["user"])
    assert set(trail.loc[trail["user"] == VIC["email"], "outcome"]) == {"refused"}
    now = selection.current_decisions(ws, POOL).set_index("pair_id")
    assert now.loc[pid, "state"] == "exclude"  # the later decision is in force
    history = selection.decision_history(ws, POOL, pid)  # and nothing was lost: both rows are kept
    assert history["action"].tolist() == ["include", "exclude"]
    assert history["email"].tolist() == [ANN["email"], BOB["email"]]
    refused = audit.activity(ws, kinds=["refused"])
    assert refused["email"].tolist() == [VIC["email"]] and refused["pair_id"].tolist() == [pid]
