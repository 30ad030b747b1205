"""With no workspace given, the dashboard opens the bundled demo (built through the library) and says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = [pytest.mark.app, pytest.mark.slow]

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def test_no_arguments_opens_the_demo(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIPS_WORKSPACE", raising=False)
    monkeypatch.setenv("CHIPS_DEMO_WS", str(tmp_path / "demo"))
    at = AppTest.from_file(MAIN, default_timeout=900)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Demo workspace" in i.value and "CHIPS_WORKSPACE" in i.value for i in at.sidebar.info)
    assert at.selectbox(key="pool_name").value == "demo-pool"
    assert at.title[0].value == "Scores"
    assert (tmp_path / "demo" / "chips.duckdb").exists()

    at.switch_page("views/browse.py").run()
    assert not at.exception, [e.value for e in at.exception]
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert cards, "the galleries show ranked pairs"
    # the demo's ground truth is shown on the cards, so a planted mistake can be seen where it ranks
    assert any("planted:" in c for c in cards)
