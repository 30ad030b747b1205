"""A decision registers at once: the pair card and the detail view's controls are fragments whose buttons
record the decision in a callback, so the fragment's own rerun already shows it (AppTest, real workspace)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chips_core.curation import selection
from chips_core.workspace import store
from tests.app.workspace_build import POOL

pytestmark = pytest.mark.app

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _state(ws_root: Path, pid: int) -> str | None:
    dec = selection.current_decisions(store.Workspace(ws_root), POOL).set_index("pair_id")
    return dec.loc[pid, "state"] if pid in dec.index else None


def test_browse_include_click_records_and_the_card_shows_it(tiny_workspace):
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    at.switch_page("views/browse.py").run()
    _ok(at)
    inc = next(b for b in at.button if b.key and b.key.startswith("top-inc-"))
    pid = int(inc.key.removeprefix("top-inc-"))
    inc.click().run()
    _ok(at)
    assert _state(tiny_workspace, pid) == "include"
    assert at.button(key=f"top-inc-{pid}").disabled and not at.button(key=f"top-exc-{pid}").disabled
    assert any(":green-badge[included]" in m.value and m.value.startswith("**#") for m in at.markdown)
    assert at.toast and "include: 1 pair(s) recorded" in at.toast[0].value


def _one_card() -> None:
    """One pair card drawn with state None on every run: what a fragment rerun reuses (the arguments of
    the last full run, before the click)."""
    import pandas as pd

    from app import context, widgets
    from chips_core.workspace import store as ws_store

    context.keep_widget_state()  # the Scores page's defaults, as app/main.py sets them on every run
    ctx = context.scoring_context(ws_store.Workspace(context.workspace_path()[0]))
    pairs = context.pool_pairs(ctx)
    pid = int(pairs.index[0])
    row = pd.Series(
        {"pair_id": pid, "rank": 1, "alignment": 0.1, "learnability": 0.2, "relevance": 0.3, "score": 0.4},
        dtype=object,
    )  # fmt: skip (object: int64 ids do not fit a float)
    widgets.pair_card(ctx, row, pairs, None, "solo")


def test_card_fragment_shows_its_decision_from_stale_arguments(tiny_workspace):
    """The card's rerun after a click shows the new decision though its `state` argument is the old one."""
    at = AppTest.from_function(_one_card, default_timeout=180)
    at.run()
    _ok(at)
    inc = next(b for b in at.button if b.key and b.key.startswith("solo-inc-"))
    pid = int(inc.key.removeprefix("solo-inc-"))
    assert not inc.disabled and not any("badge[" in m.value for m in at.markdown)
    inc.click().run()
    _ok(at)
    assert _state(tiny_workspace, pid) == "include"
    assert at.button(key=f"solo-inc-{pid}").disabled
    assert any(":green-badge[included]" in m.value for m in at.markdown)
    at.button(key=f"solo-exc-{pid}").click().run()
    _ok(at)
    assert _state(tiny_workspace, pid) == "exclude"
    assert any(":red-badge[excluded]" in m.value for m in at.markdown)
    assert not at.button(key=f"solo-inc-{pid}").disabled


def test_detail_view_decision_shows_at_once(tiny_workspace):
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    at.switch_page("views/browse.py").run()
    why = next(b for b in at.button if b.key and b.key.startswith("top-why-"))
    pid = int(why.key.removeprefix("top-why-"))
    why.click().run()
    _ok(at)
    assert any(m.value == "**Decision:** none (the score decides)" for m in at.markdown)
    at.button(key="detail-exclude").click().run()
    _ok(at)
    assert _state(tiny_workspace, pid) == "exclude"
    assert any(m.value.startswith("**Decision:** exclude · by ") for m in at.markdown)  # who and when
    assert at.button(key="detail-exclude").disabled and not at.button(key="detail-clear").disabled
    at.button(key="detail-clear").click().run()
    assert _state(tiny_workspace, pid) is None
