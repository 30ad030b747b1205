"""Fixtures of the dashboard tests: one tiny real workspace per session, copied per test (tests write)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.app.workspace_build import build_tiny_workspace


@pytest.fixture(scope="session")
def tiny_workspace_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace built once per session through ingest → featurize → prepare → map."""
    return build_tiny_workspace(tmp_path_factory.mktemp("tiny")).root


@pytest.fixture
def tiny_workspace(tiny_workspace_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny workspace, opened by the dashboard through env CHIPS_WORKSPACE."""
    ws = tmp_path / "ws"
    shutil.copytree(tiny_workspace_template, ws)
    monkeypatch.setenv("CHIPS_WORKSPACE", str(ws))
    return ws
