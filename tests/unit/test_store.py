import pytest

from chips_core.workspace.store import SCHEMA_VERSION, Workspace, WorkspaceError, atomic_write_bytes

pytestmark = pytest.mark.unit


def test_init_is_idempotent_and_versioned(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    Workspace.init(tmp_path / "ws")
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_missing_workspace_is_named(tmp_path):
    with pytest.raises(WorkspaceError, match="not a CHIPS workspace"):
        Workspace(tmp_path / "nope").check()


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
