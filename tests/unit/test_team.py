"""Team curation on a real DuckDB workspace: roles checked in the library, the audit trail, decisions from
two users (threads, as two browser sessions of one dashboard), and which decisions a selection applied.

Expected values are computed independently from the raw `decisions` rows (pandas), not from the library's
queries."""

import json
import threading
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from chips_core.cli.main import main as chips
from chips_core.curation import export
from chips_core.curation import selection as sel
from chips_core.team import audit, roles
from chips_core.team.identity import ENV_ACTOR, Actor, actor_from_claims, current_actor, local_actor
from chips_core.workspace import jobs, store
from chips_core.workspace.store import Workspace
from tests.pool_rows import add_pool

pytestmark = pytest.mark.unit

N = 12
ANA = actor_from_claims({"sub": "sub-ana", "email": "Ana@Hospital.org", "name": "Ana"})
BEN = actor_from_claims({"sub": "sub-ben", "email": "ben@hospital.org"})
VIC = actor_from_claims({"sub": "sub-vic", "email": "vic@hospital.org"})
LEA = actor_from_claims({"sub": "sub-lea", "email": "lea@hospital.org"})


@pytest.fixture
def team_ws(tmp_path):
    """A workspace with one pool of N pairs, a stored score run, and grants: Ana and Ben curators, Lea
    lead (granted by the local user); Vic has no grant (a viewer)."""
    ws = Workspace.init(tmp_path / "ws")
    ids = np.arange(N, dtype=np.int64) * 10 + 3
    paths, captions = [f"/img/{i}.png" for i in ids], [f"caption {i}" for i in ids]
    pairs = pd.DataFrame({"pair_id": ids, "row_index": np.arange(N), "filepath": paths, "caption": captions})
    pool_id = add_pool(ws, pairs)
    table = pd.DataFrame(
        {"pair_id": ids, "alignment": -np.arange(N, dtype=float), "learnability": 1.0, "relevance": 1.0}
    )
    table["score"], table["rank"] = table["alignment"], np.arange(1, N + 1)
    run = sel.record_score_run(ws, "pool", table, "chips", {"rank_params": {"alpha": 0.3, "k": 64}})
    local = local_actor()
    roles.grant(ws, local, "ana@hospital.org", "curator")
    roles.grant(ws, local, "BEN@hospital.org", "curator")
    roles.grant(ws, local, "lea@hospital.org", "lead")
    return ws, pool_id, ids, run


def test_identity_from_claims_and_for_jobs(monkeypatch):
    assert Actor("sub-ana", "ana@hospital.org", "Ana", signed_in=True) == ANA
    assert ANA.display == "Ana" and BEN.display == "ben@hospital.org"
    with pytest.raises(ValueError, match="sub"):
        actor_from_claims({"email": "x@y.org"})
    unverified = actor_from_claims({"sub": "s-9", "email": "lea@hospital.org", "email_verified": False})
    assert unverified.email is None and unverified.keys == ("s-9",)  # cannot take over Lea's e-mail grant
    monkeypatch.setenv("CHIPS_AUTHOR", "dr-who")
    assert local_actor() == Actor("local:dr-who", None, "dr-who", signed_in=False)
    monkeypatch.setenv(ENV_ACTOR, ANA.to_env()[ENV_ACTOR])  # what jobs.launch gives a background job
    assert current_actor() == ANA
    assert current_actor(BEN) == BEN


def test_roles_in_force_and_local_user_is_lead(team_ws):
    ws, *_ = team_ws
    assert roles.role_of(ws, local_actor()) == "lead"
    assert [roles.role_of(ws, a) for a in (ANA, BEN, VIC, LEA)] == ["curator", "curator", "viewer", "lead"]
    roles.grant(ws, LEA, "ben@hospital.org", "viewer")  # a lead changes a role; the latest grant wins
    assert roles.role_of(ws, BEN) == "viewer"
    m = roles.members(ws).set_index("member")
    assert (
        m.loc["ben@hospital.org", "role"] == "viewer" and m.loc["ben@hospital.org", "granted_by"] == LEA.email
    )
    assert roles.can(ws, ANA, "decide") and not roles.can(ws, ANA, "export")
    with pytest.raises(roles.AccessDenied, match="curator .*cannot change roles.*lead"):
        roles.grant(ws, ANA, "vic@hospital.org", "lead")
    assert roles.role_of(ws, VIC) == "viewer"
    with pytest.raises(Exception, match="unknown role"):
        roles.grant(ws, LEA, "vic@hospital.org", "admin")


def test_a_viewer_write_is_refused_and_logged(team_ws):
    ws, pool_id, ids, run = team_ws
    with pytest.raises(roles.AccessDenied, match="vic@hospital.org is a viewer .*record decisions.*curator"):
        sel.record_decisions(ws, "pool", ids[:3], "exclude", actor=VIC)
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 0  # nothing written
    refused = audit.activity(ws, kinds=["refused"])
    assert len(refused) == 1
    row = refused.iloc[0]
    assert (row["user"], row["action"], row["outcome"]) == ("vic@hospital.org", "decide", "refused")
    assert json.loads(row["params"])["pair_ids"] == [int(i) for i in ids[:3]]
    # a bulk refusal is found by any of its pairs, and not by another pair
    assert (
        len(audit.activity(ws, pair_id=int(ids[1]))) == 1
        and len(audit.activity(ws, pair_id=int(ids[5]))) == 0
    )
    with pytest.raises(roles.AccessDenied):
        sel.save_selection(ws, "pool", run, 0.5, "top", actor=ANA)  # curators cannot save selections
    with pytest.raises(roles.AccessDenied):
        jobs.launch(ws, "train", ["train", str(ws.root)], actor=ANA)
    with pytest.raises(roles.AccessDenied):  # the command decides, not the label
        jobs.launch(ws, "harmless", ["map", str(ws.root), "pool"], actor=VIC)
    assert jobs.list_jobs(ws) == []  # the refused jobs never started
    assert [jobs.job_action(a) for a in (["prepare"], ["map"], ["evaluate"], ["demo"], [])] == [
        "manage",
        "manage",
        "train",
        None,
        None,
    ]
    assert len(audit.activity(ws, kinds=["refused"], users=["ana@hospital.org"])) == 2
    assert len(audit.activity(ws, kinds=["refused"], users=["vic@hospital.org"])) == 2


def test_decisions_carry_identity_and_score_run_in_the_trail(team_ws):
    ws, pool_id, ids, run = team_ws
    sel.record_decisions(ws, "pool", ids[:2], "include", score_run_id=run, actor=ANA)
    sel.record_decision(ws, "pool", ids[0], "note", note="=HYPERLINK(1)", actor=BEN)
    raw = sel.decision_history(ws, "pool")
    assert raw[["subject", "email", "author"]].values.tolist() == [
        ["sub-ana", "ana@hospital.org", "Ana"],
        ["sub-ana", "ana@hospital.org", "Ana"],
        ["sub-ben", "ben@hospital.org", "ben@hospital.org"],
    ]
    trail = audit.activity(ws, kinds=["decision"])
    assert trail["object_id"].tolist() == raw["decision_id"].tolist()[::-1]  # newest first
    ana_rows = audit.activity(ws, users=["ana@hospital.org"], kinds=["decision"])
    assert len(ana_rows) == 2 and set(ana_rows["score_run_id"]) == {run}
    assert json.loads(ana_rows["params"].iloc[0])["rank_params"] == {"alpha": 0.3, "k": 64}
    assert len(audit.activity(ws, pair_id=int(ids[0]), kinds=["decision"])) == 2
    now = datetime.now()
    assert len(audit.activity(ws, kinds=["decision"], since=now + timedelta(hours=1))) == 0
    assert len(audit.activity(ws, kinds=["decision"], until=now + timedelta(hours=1))) == 3
    assert {"ana@hospital.org", "ben@hospital.org"} <= set(audit.activity_users(ws))
    csv = pd.read_csv(pd.io.common.BytesIO(audit.activity_csv(ws, kinds=["decision"])))
    assert len(csv) == 3 and "'=HYPERLINK(1)" in csv["detail"].tolist()  # spreadsheet-safe
    with pytest.raises(ValueError, match="unknown activity kind"):
        audit.activity(ws, kinds=["nope"])


def test_two_users_deciding_at_once_lose_nothing_and_the_latest_wins(team_ws):
    ws, pool_id, ids, _ = team_ws
    pairs = ids[:4]
    errors: list[BaseException] = []

    def curate(actor: Actor, action: str) -> None:
        try:
            for _ in range(10):
                for p in pairs:
                    sel.record_decision(ws, "pool", p, action, actor=actor)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=curate, args=a) for a in ((ANA, "include"), (BEN, "exclude"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    raw = sel.decision_history(ws, "pool")
    assert len(raw) == 2 * 10 * len(pairs)  # every decision of both users is kept
    assert raw.groupby("email").size().to_dict() == {"ana@hospital.org": 40, "ben@hospital.org": 40}
    latest = raw.sort_values("decision_id").groupby("pair_id").tail(1).set_index("pair_id")
    cur = sel.current_decisions(ws, "pool").set_index("pair_id")
    assert cur["state"].to_dict() == latest["action"].to_dict()
    assert cur["email"].to_dict() == latest["email"].to_dict()


def test_a_change_by_another_user_is_shown_once_with_who(team_ws):
    ws, pool_id, ids, _ = team_ws
    mark = audit.latest_decision_id(ws, pool_id)
    sel.record_decision(ws, "pool", ids[0], "include", actor=ANA)
    sel.record_decision(ws, "pool", ids[1], "include", actor=ANA)
    sel.record_decision(ws, "pool", ids[0], "exclude", actor=BEN)
    sel.record_decision(ws, "pool", ids[1], "include", actor=BEN)  # the same state: no conflict
    seen = audit.changed_by_others(ws, pool_id, ANA, mark)
    assert seen[["pair_id", "yours", "theirs", "by"]].values.tolist() == [
        [ids[0], "include", "exclude", "ben@hospital.org"]
    ]
    assert audit.changed_by_others(ws, pool_id, BEN, mark).empty  # Ben's own change is not news to him
    mark = audit.latest_decision_id(ws, pool_id)
    assert audit.changed_by_others(ws, pool_id, ANA, mark).empty  # shown once: the watermark moved on
    sel.record_decision(ws, "pool", ids[0], "include", actor=ANA)  # Ana takes it back
    sel.record_decision(ws, "pool", ids[0], "clear", actor=BEN)
    assert audit.changed_by_others(ws, pool_id, ANA, mark)["theirs"].tolist() == ["clear"]
    assert audit.changed_by_others(ws, pool_id, local_actor(), 0).empty


def test_a_selection_records_exactly_the_decisions_it_applied(team_ws):
    ws, pool_id, ids, run = team_ws
    sel.record_decision(ws, "pool", ids[0], "exclude", actor=ANA)
    sel.record_decision(ws, "pool", ids[0], "include", actor=BEN)  # replaces Ana's row
    sel.record_decision(ws, "pool", ids[11], "include", actor=ANA)
    sel.record_decision(ws, "pool", ids[5], "exclude", actor=ANA)
    sel.record_decision(ws, "pool", ids[6], "exclude", actor=ANA)
    sel.record_decision(ws, "pool", ids[6], "clear", actor=BEN)  # no decision in force
    sel.record_decision(ws, "pool", ids[7], "note", note="check", actor=BEN)  # a note decides nothing
    sid = sel.save_selection(ws, "pool", run, 0.5, "top", actor=LEA)
    raw = sel.decision_history(ws, "pool")
    states = raw[raw["action"].isin(["include", "exclude", "clear"])].sort_values("decision_id")
    in_force = states.groupby("pair_id").tail(1)
    expected = sorted(in_force["decision_id"].astype(int))  # a clear in force was applied too
    with ws.connect(read_only=True) as con:
        applied = [
            r[0]
            for r in con.execute(
                f"SELECT decision_id FROM selection_decisions WHERE selection_id = {sid} ORDER BY 1"
            ).fetchall()
        ]
    assert applied == expected and len(applied) == 4
    shown = sel.applied_decisions(ws, sid)  # what an audit (and the export manifest) reads
    assert shown["decision_id"].tolist() == expected
    assert shown.set_index("pair_id")["by"].to_dict() == {
        ids[0]: "ben@hospital.org",
        ids[5]: "ana@hospital.org",
        ids[6]: "ben@hospital.org",
        ids[11]: "ana@hospital.org",
    }
    event = audit.activity(ws, kinds=["selection"]).iloc[0]
    assert (event["user"], event["object_id"], event["score_run_id"]) == ("lea@hospital.org", sid, run)
    assert json.loads(event["params"])["score_run_params"]["rank_params"]["alpha"] == 0.3


def test_exports_and_downloads_need_a_lead_and_are_audited(team_ws, tmp_path):
    ws, pool_id, ids, run = team_ws
    sid = sel.save_selection(ws, "pool", run, 0.25, "top")
    with pytest.raises(roles.AccessDenied, match="export"):
        export.export_bytes(ws, sid, "ids", actor=ANA)
    export.export_bytes(ws, sid, "ids", actor=LEA)
    sel.record_decision(ws, "pool", ids[2], "exclude", actor=ANA)  # after the save: not applied
    done = export.export_selection(ws, sid, "ids", tmp_path / "out.npy", actor=LEA)
    assert json.loads(done.manifest_path.read_text())["decisions_applied"] == []
    events = audit.activity(ws, kinds=["export"])
    assert events["object_id"].tolist()[0] == done.export_id and pd.isna(events["object_id"].tolist()[1])
    assert set(events["user"]) == {"lea@hospital.org"} and set(events["score_run_id"]) == {run}
    assert [json.loads(p)["to"] for p in events["params"]] == [str(done.path), "browser download"]


def test_an_older_workspace_is_upgraded_in_place(tmp_path):
    ws = Workspace.init(tmp_path / "old")
    with ws.connect() as con:  # back to the version-1 schema
        for table in ("members", "audit_log", "selection_decisions"):
            con.execute(f"DROP TABLE {table}")
        con.execute("ALTER TABLE decisions DROP COLUMN subject")
        con.execute("ALTER TABLE decisions DROP COLUMN email")
        con.execute("UPDATE schema_version SET version = 1")
    store._current.clear()  # a new process
    assert roles.members(Workspace(ws.root)).empty
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(store.SCHEMA_VERSION,)]
        assert {"subject", "email"} <= {r[0] for r in con.execute("DESCRIBE decisions").fetchall()}


def test_cli_grants_lists_and_writes_the_trail(team_ws, tmp_path, capsys):
    ws, pool_id, ids, _ = team_ws
    assert chips(["team", str(ws.root), "grant", "Vic@Hospital.org", "curator"]) == 0
    assert roles.role_of(ws, VIC) == "curator"
    assert chips(["team", str(ws.root), "list"]) == 0
    listed = capsys.readouterr().out
    assert "vic@hospital.org\tcurator" in listed and "lea@hospital.org\tlead" in listed
    sel.record_decision(ws, "pool", ids[3], "exclude", actor=VIC)
    out = tmp_path / "trail.csv"
    assert chips(["activity", str(ws.root), "--user", "vic@hospital.org", "--csv", str(out)]) == 0
    trail = pd.read_csv(out)
    assert trail["kind"].tolist() == ["decision"] and trail["pair_id"].tolist() == [ids[3]]
    assert chips(["activity", str(ws.root), "--kind", "grant"]) == 0
    assert capsys.readouterr().out.count("grant") >= 4


def test_single_user_mode_reads_no_roles(team_ws):
    """Without sign-in the local user is the lead and no role is read per write: with the members table
    gone, the local user still decides, saves and exports, while a signed-in user's check fails loudly."""
    ws, pool_id, ids, run = team_ws
    with ws.connect() as con:
        con.execute("DROP TABLE members")
    sel.record_decision(ws, "pool", ids[0], "include")
    sid = sel.save_selection(ws, "pool", run, 0.5, "top")
    assert export.export_bytes(ws, sid, "ids").n_rows == N // 2
    with pytest.raises(Exception, match="members"):
        sel.record_decision(ws, "pool", ids[1], "include", actor=ANA)


def test_the_latest_row_names_who_decided_even_without_an_e_mail(team_ws, monkeypatch):
    """A local (CLI) decision after a signed-in one: the state's e-mail and score run are the latest row's
    (NULL), not the previous decider's (DuckDB's arg_max skips NULL values; arg_max_null does not)."""
    ws, pool_id, ids, run = team_ws
    monkeypatch.setenv("CHIPS_AUTHOR", "night-shift")
    sel.record_decision(ws, "pool", ids[0], "include", score_run_id=run, actor=ANA)
    sel.record_decision(ws, "pool", ids[0], "exclude")  # the local user, no e-mail, no score run
    row = sel.current_decisions(ws, "pool").set_index("pair_id").loc[ids[0]]
    assert (row["state"], row["author"], row["email"]) == ("exclude", "night-shift", None)
    assert pd.isna(row["score_run_id"])
