"""The workspace query layer (chips_core.workspace.catalog) on a real DuckDB workspace.

Expected values come from rows inserted here with plain SQL, not from the functions under test.
"""

import json

import pytest

from chips_core.errors import ChipsError
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, WorkspaceError

pytestmark = pytest.mark.unit


def _pool(con, pool_id, name, kind="pool", status="ready", options=None):
    con.execute(
        "INSERT INTO pools (pool_id, name, kind, source, format, options, status) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [pool_id, name, kind, f"/data/{name}.csv", "csv", json.dumps(options or {}), status],
    )


def _pairs(con, pool_id, n):
    for i in range(n):
        con.execute(
            "INSERT INTO pairs (pool_id, pair_id, row_index, filepath, caption, label) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [pool_id, 1000 * pool_id + i, i, f"/img/{pool_id}-{i}.jpg", f"caption {i}", None],
        )


def _rejects(con, pool_id, reasons):
    for i, reason in enumerate(reasons):
        con.execute(
            "INSERT INTO rejects (pool_id, source_ref, reason, detail) VALUES (?, ?, ?, ?)",
            [pool_id, f"row {i}", reason, None],
        )


@pytest.fixture()
def ws(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        _pool(con, 10, "train", options={"encoding_detected": "utf-8"})
        _pool(con, 20, "target", kind="eval")
        _pool(con, 30, "broken", status="failed", options={"error": "boom"})
        _pairs(con, 10, 3)
        _pairs(con, 20, 2)
        _rejects(con, 10, ["missing_file", "missing_file"])
        _rejects(con, 30, ["unreadable"])
    return ws


def test_pool_id_by_name_and_id(ws):
    assert catalog.pool_id(ws, "train") == 10
    assert catalog.pool_id(ws, "target") == 20
    assert catalog.pool_id(ws, 30) == 30  # an int that names no pool is taken as an id
    with ws.connect(read_only=True) as con:  # inside a caller's connection too
        assert catalog.pool_id(con, "broken") == 30
    assert catalog.find_pool_id(ws, "nope") is None


def test_unknown_pool_is_named_with_the_pools_there_are(ws):
    with pytest.raises(catalog.UnknownPoolError) as err:
        catalog.pool_id(ws, "nope")
    assert isinstance(err.value, WorkspaceError) and isinstance(err.value, ChipsError)
    message = str(err.value)
    assert "'nope'" in message and str(ws.root) in message
    assert "broken, target, train" in message
    with pytest.raises(catalog.UnknownPoolError, match="no pool named 99"):
        catalog.pool_id(ws, 99)


def test_pools_overview_counts(ws):
    df = catalog.pools_overview(ws)
    assert df["pool_id"].tolist() == [10, 20, 30]
    got = {r.name: (r.kind, r.status, int(r.pairs), int(r.rejects)) for r in df.itertuples()}
    assert got == {
        "train": ("pool", "ready", 3, 2),
        "target": ("eval", "ready", 2, 0),
        "broken": ("pool", "failed", 0, 1),
    }
    assert df.set_index("name").at["train", "encoding"] == "utf-8"
    assert df.set_index("name").at["broken", "error"] == "boom"
    evals = catalog.pools_overview(ws, "eval")
    assert evals["name"].tolist() == ["target"] and int(evals["pairs"].iloc[0]) == 2


def test_pool_record_counts_and_reasons(ws):
    rec = catalog.pool_record(ws, "train")
    assert (rec.pool_id, rec.kind, rec.format, rec.status, rec.n_pairs) == (10, "pool", "csv", "ready", 3)
    assert catalog.pool_record(ws, "nope") is None
    assert catalog.count_pairs(ws, 10) == 3 and catalog.count_rejects(ws, 10) == 2
    assert catalog.reject_counts(ws, 30) == {"unreadable": 1}
    assert catalog.pool_names(ws) == [("broken", "pool"), ("target", "eval"), ("train", "pool")]
    frame = catalog.pairs_frame(ws, 10, ordered=True)
    assert frame["pair_id"].tolist() == [10000, 10001, 10002]
    assert frame["caption"].tolist() == ["caption 0", "caption 1", "caption 2"]


def test_model_spec_round_trip(ws):
    spec = catalog.ModelSpec(7, "ViT-B-32", "openai", "/ckpt/model.pt", "ab" * 32)
    with ws.connect() as con:
        catalog.insert_model(con, spec)
        con.execute(
            "INSERT INTO feature_runs (run_id, pool_id, model_id, status, dir) VALUES (?, ?, ?, ?, ?)",
            [40, 10, 7, "done", "/ws/features/40"],
        )
    assert catalog.model_spec(ws, 7) == spec
    assert catalog.run_model_spec(ws, 40) == spec
    assert catalog.run_model_spec(ws, 41) is None
    assert catalog.find_model_id(ws, "ViT-B-32", "openai", "ab" * 32) == 7
    assert catalog.find_model_id(ws, "ViT-B-32", "openai", None) is None
    with ws.connect(read_only=True) as con:
        row = con.execute("SELECT name, pretrained, checkpoint, checkpoint_sha256 FROM models").fetchall()
    assert row == [("ViT-B-32", "openai", "/ckpt/model.pt", "ab" * 32)]
    runs = catalog.feature_runs_of_pool(ws, "train")
    assert runs == [(40, 7, "ViT-B-32", "openai", "/ckpt/model.pt")]


@pytest.mark.parametrize(
    ("spec", "args", "random_init"),
    [
        (catalog.ModelSpec(1, "ViT-B-32", "openai"), ("ViT-B-32", "openai", None), False),
        (catalog.ModelSpec(1, "ViT-B-32", None, "/c/m.pt", "x"), ("ViT-B-32", "/c/m.pt", None), False),
        (
            catalog.ModelSpec(1, "local-dir:/m", None, "/m/open_clip_model.safetensors", "x"),
            ("local-dir:/m", None, None),
            False,
        ),
        (catalog.ModelSpec(1, "tiny", "random-init:seed=3"), ("tiny", None, 3), True),
    ],
)
def test_model_spec_load_args(spec, args, random_init):
    assert spec.load_args() == args
    assert spec.random_init is random_init


def test_pool_dependents_and_cascade(ws):
    with ws.connect() as con:
        con.execute(
            "INSERT INTO feature_runs (run_id, pool_id, model_id, status, dir) "
            "VALUES (50, 10, 1, 'done', '/f/50')"
        )
        con.execute(
            "INSERT INTO scoring_caches (cache_id, pool_run_id, eval_run_id, config, dir, status) "
            "VALUES (60, 50, 50, '{}', '/c/60', 'done')"
        )
        deps = catalog.pool_dependents(ws, con, 10)
        assert deps["feature_runs"] == [50] and deps["caches"] == [60]
        assert "/f/50" in deps["files"] and "/c/60" in deps["files"]
        catalog.delete_pool_rows(con, 10, deps["feature_runs"], deps["caches"], [], [])
    assert catalog.find_pool_id(ws, "train") is None
    assert catalog.count_pairs(ws, 10) == 0 and catalog.scoring_cache(ws, 60) is None
    assert catalog.pool_id(ws, "target") == 20
