"""Ingest end to end on real files into a real DuckDB workspace: every format, every bad-input kind,
idempotence, a SIGKILLed run resumed, and a read-only reader process working while ingest writes."""

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from fixtures_build import (
    make_bad_pool,
    make_csv_pool,
    make_dicom_pool,
    make_folder_pool,
    make_parquet_pool,
    make_wds_pool,
    write_images,
)

from chips_core.pools.ingest import IngestSummary, ingest, pool_summary
from chips_core.pools.records import PoolError, pair_id, read_image_bytes
from chips_core.workspace.store import Workspace

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _pairs(ws: Workspace, name: str) -> list[tuple]:
    with ws.connect(read_only=True) as con:
        return con.execute(
            "SELECT pair_id, row_index, filepath, caption, label, width, height FROM pairs "
            "JOIN pools USING (pool_id) WHERE name = ? ORDER BY row_index",
            [name],
        ).fetchall()


def _rejects(ws: Workspace, name: str) -> dict[str, str]:
    with ws.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT source_ref, reason FROM rejects JOIN pools USING (pool_id) WHERE name = ?", [name]
        ).fetchall()
    return dict(rows)


def _assert_ids_match_content(rows: list[tuple]) -> None:
    for pid, _, ref, caption, *_ in rows:
        assert pid == pair_id(read_image_bytes(ref), caption), ref


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


def test_every_format(ws, tmp_path):
    csv_m = make_csv_pool(tmp_path / "a", n=6)
    tsv_m = make_csv_pool(tmp_path / "b", n=5, sep="\t", relative=False, fmt="jpg")
    parquet = make_parquet_pool(tmp_path, n=4)
    folder = make_folder_pool(tmp_path, n=4)
    wds_txt = make_wds_pool(tmp_path / "c", n=7, shards=2)
    wds_json = make_wds_pool(tmp_path / "d", n=5, shards=2, caption="json")
    dicom = make_dicom_pool(tmp_path)
    cases = [
        ("csv", csv_m, {"label_col": "label"}, 6),
        ("tsv", tsv_m, {}, 5),
        ("parquet", parquet, {"image_col": "image", "caption_col": "text", "label_col": "label"}, 4),
        ("folder", folder, {}, 4),
        ("wds_txt", wds_txt, {}, 7),
        ("wds_json", wds_json / "shard-{00000..00001}.tar", {"label_col": "label"}, 5),
        ("dicom", dicom, {"caption_template": "{Modality} image of {PatientName}"}, 5),
    ]
    for name, source, kw, n in cases:
        summary = ingest(ws, name, source, workers=0, **kw)
        assert (summary.n_pairs, summary.n_rejects, summary.n_checked) == (n, 0, n), name
        rows = _pairs(ws, name)
        assert [r[1] for r in rows] == list(range(n))
        _assert_ids_match_content(rows)
        assert all(w > 0 and h > 0 for *_, w, h in rows)
    assert {r[4] for r in _pairs(ws, "csv")} >= {"retina", "cell"}
    assert _pairs(ws, "wds_json")[1][4] == "cell" and "::sample000001.jpg" in _pairs(ws, "wds_json")[1][2]
    assert _pairs(ws, "wds_txt")[0][4] == "retina"  # from the .cls member
    dicom_rows = {Path(r[2]).name: r for r in _pairs(ws, "dicom")}
    assert dicom_rows["CT_small.dcm"][3].startswith("CT image of ") and dicom_rows["CT_small.dcm"][5:] == (
        128,
        128,
    )
    with ws.connect(read_only=True) as con:
        formats = dict(con.execute("SELECT name, format FROM pools").fetchall())
    assert formats["wds_json"] == "wds" and formats["tsv"] == "tsv" and formats["dicom"] == "dicom"


def test_dicom_through_a_manifest_caption_column(ws, tmp_path):
    dicom = make_dicom_pool(tmp_path, names=("CT_small.dcm", "MR_small.dcm"))
    manifest = tmp_path / "dicom.csv"
    manifest.write_text("path,report\ndicom/CT_small.dcm,axial CT slice\ndicom/MR_small.dcm,MR of the head\n")
    ingest(ws, "d", manifest, image_col="path", caption_col="report", workers=0)
    rows = _pairs(ws, "d")
    assert [(Path(r[2]).parent, r[3]) for r in rows] == [(dicom, "axial CT slice"), (dicom, "MR of the head")]
    _assert_ids_match_content(rows)


def test_every_bad_input_kind_is_rejected_with_reason_and_the_rest_kept(ws, tmp_path):
    manifest, expected = make_bad_pool(tmp_path)
    summary = ingest(ws, "bad", manifest, workers=2, chunk_size=4)
    got = {int(ref.rsplit("row ", 1)[1]): reason for ref, reason in _rejects(ws, "bad").items()}
    assert got == expected
    assert set(summary.reject_counts) == set(expected.values())
    assert summary.n_rejects == len(expected) and summary.n_pairs == 5
    rows = _pairs(ws, "bad")
    _assert_ids_match_content(rows)
    assert rows[-1][3] == 'an absolute path, a caption with "quotes", commas, and\na newline'  # byte exact
    with ws.connect(read_only=True) as con:  # every reject names its file and row
        for ref, detail in con.execute("SELECT source_ref, detail FROM rejects").fetchall():
            assert detail.startswith(ref) and "pool.csv:row " in detail
    text = summary.format()
    assert "5 pairs, 13 rejected" in text and "decompression_bomb" in text and "SELECT * FROM rejects" in text


def test_process_pool_gives_the_same_rows_as_in_process(ws, tmp_path):
    manifest, _ = make_bad_pool(tmp_path)
    ingest(ws, "serial", manifest, workers=0, chunk_size=3)
    ingest(ws, "parallel", manifest, workers=2, chunk_size=5)
    assert _pairs(ws, "serial") == _pairs(ws, "parallel")
    assert _rejects(ws, "serial") == _rejects(ws, "parallel")


def test_reingest_is_idempotent_and_conflicts_are_clear(ws, tmp_path):
    manifest = make_csv_pool(tmp_path, n=4)
    first = ingest(ws, "p", manifest, workers=0)
    again = ingest(ws, "p", str(manifest), workers=0)
    assert isinstance(first, IngestSummary) and first.fmt == "csv" and first.kind == "pool"
    assert again.already_done and again.n_checked == 0 and again.n_pairs == first.n_pairs == 4
    assert "already ingested" in again.format()
    assert pool_summary(ws, "p").n_pairs == 4
    other = make_csv_pool(tmp_path / "other", n=2)
    with pytest.raises(PoolError, match=r"pool 'p' already exists with source .*choose another name"):
        ingest(ws, "p", other)
    with pytest.raises(PoolError, match="options"):
        ingest(ws, "p", manifest, caption_col="label")
    with pytest.raises(PoolError, match="does not exist"):
        ingest(ws, "q", tmp_path / "missing.csv")
    with pytest.raises(PoolError, match="unknown format"):
        ingest(ws, "q", manifest, fmt="xlsx")
    with pytest.raises(PoolError, match="kind"):
        ingest(ws, "q", manifest, kind="test")
    assert _pairs(ws, "p") and not _pairs(ws, "q")


def test_eval_kind_and_duplicates_across_chunks(ws, tmp_path):
    items = write_images(tmp_path / "img", 3)
    manifest = tmp_path / "eval.csv"
    lines = ["filepath,title"] + [f'{p},"{c}"' for p, c, _ in items] * 2 + [f"{items[0][0]},another caption"]
    manifest.write_text("\n".join(lines) + "\n")
    summary = ingest(ws, "ev", manifest, kind="eval", workers=0, chunk_size=2)
    assert summary.kind == "eval" and summary.n_pairs == 4 and summary.reject_counts == {"duplicate_pair": 3}
    with ws.connect(read_only=True) as con:
        details = [d for (d,) in con.execute("SELECT detail FROM rejects ORDER BY source_ref").fetchall()]
    assert all("same image bytes and caption" in d for d in details)


def test_wds_member_refs_load_and_broken_members_are_rejected(ws, tmp_path):
    folder = make_wds_pool(tmp_path, n=4, shards=1)
    with tarfile.open(folder / "extra.tar", "w") as tf:
        for name, data in (("z1.jpg", b""), ("z1.txt", b"empty image"), ("z2.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    summary = ingest(ws, "w", folder, workers=0)
    assert summary.n_pairs == 4 and summary.reject_counts == {"zero_bytes": 1, "missing_file": 1}
    rejects = _rejects(ws, "w")
    assert rejects[f"{folder / 'extra.tar'}::z2"] == "missing_file"


def _slow_ingest(ws: Workspace, manifest: Path, name: str, delay: float) -> subprocess.Popen:
    """A real `ingest` in a child process, slowed down after each committed chunk."""
    code = textwrap.dedent(
        f"""
        import time
        from chips_core.workspace.store import Workspace
        from chips_core.pools.ingest import ingest
        ingest(Workspace({str(ws.root)!r}), {name!r}, {str(manifest)!r}, workers=0, chunk_size=8,
               progress=lambda done, total: time.sleep({delay}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)


def _count(ws: Workspace, name: str) -> tuple[int, int, str | None]:
    with ws.connect(read_only=True) as con:
        row = con.execute("SELECT pool_id, status FROM pools WHERE name = ?", [name]).fetchone()
        if row is None:
            return 0, 0, None
        n_pairs = con.execute("SELECT count(*) FROM pairs WHERE pool_id = ?", [row[0]]).fetchone()[0]
        n_rej = con.execute("SELECT count(*) FROM rejects WHERE pool_id = ?", [row[0]]).fetchone()[0]
    return int(n_pairs), int(n_rej), row[1]


def _bigger_bad_pool(tmp_path: Path) -> Path:
    """The bad pool's rows plus 60 good ones: several chunks, rejects spread over them."""
    manifest, _ = make_bad_pool(tmp_path)
    extra = write_images(manifest.parent / "more", 60, seed=3)
    with open(manifest, "a", encoding="utf-8") as f:
        for path, caption, _ in extra:
            f.write(f'{path},"{caption}"\n')
    return manifest


def test_sigkilled_ingest_resumes_without_loss_or_duplicates(tmp_path):
    manifest = _bigger_bad_pool(tmp_path)
    reference = Workspace.init(tmp_path / "ref")
    ingest(reference, "p", manifest, workers=0)
    ws = Workspace.init(tmp_path / "ws")
    proc = _slow_ingest(ws, manifest, "p", delay=0.4)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            n_pairs, _, status = _count(ws, "p")
            if n_pairs >= 15:
                break
            assert proc.poll() is None, "the child finished before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    n_pairs, n_rej, status = _count(ws, "p")
    assert status == "ingesting" and 15 <= n_pairs < len(_pairs(reference, "p"))
    summary = ingest(ws, "p", manifest, workers=2)
    assert summary.resumed_from > 0 and summary.n_checked < 78
    assert _pairs(ws, "p") == _pairs(reference, "p")
    assert _rejects(ws, "p") == _rejects(reference, "p")
    assert _count(ws, "p")[2] == "ready"


def test_a_reader_process_reads_while_ingest_writes(tmp_path):
    manifest = _bigger_bad_pool(tmp_path)
    ws = Workspace.init(tmp_path / "ws")
    proc = _slow_ingest(ws, manifest, "p", delay=0.15)
    seen = []
    try:
        while proc.poll() is None:
            seen.append(_count(ws, "p"))  # read_only connections between the writer's transactions
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    final = _count(ws, "p")
    assert final[:2] == (65, 13) and final[2] == "ready"
    totals = [a + b for a, b, _ in seen]
    assert totals == sorted(totals), "a reader saw rows disappear"
    assert len({t for t in totals if 0 < t < 78}) >= 3, (
        f"no intermediate states observed: {sorted(set(totals))}"
    )
    assert all(t % 8 == 0 for t in totals if t < 78), "a reader saw a partly written chunk"


def test_progress_reports_totals_and_a_concurrent_writer_is_refused(ws, tmp_path):
    manifest = make_csv_pool(tmp_path, n=7)
    calls = []
    ingest(
        ws, "p", manifest, workers=0, chunk_size=3, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(3, 7), (6, 7), (7, 7)]

    def other_process_advances(done, total):  # what a second ingest of the same pool would do
        with ws.connect() as con:
            con.execute("UPDATE pools SET options = json_object('next_row', 99) WHERE name = 'q'")

    with pytest.raises(PoolError, match="another process"):
        ingest(ws, "q", manifest, workers=0, chunk_size=3, progress=other_process_advances)
    assert len(_pairs(ws, "q")) == 3  # the first chunk stays; the conflicting one was rolled back


def test_killed_worker_processes_are_replaced_without_loss(ws, tmp_path):
    manifest = _bigger_bad_pool(tmp_path)
    ingest(ws, "reference", manifest, workers=0)
    killed = []

    def kill_workers(done, total):  # what the OOM killer or a crashing decoder does to a worker
        if len(killed) < 2:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)

    summary = ingest(ws, "p", manifest, workers=2, chunk_size=8, progress=kill_workers)
    assert len(killed) >= 2 and summary.n_checked == 78
    assert [r[:5] for r in _pairs(ws, "p")] == [r[:5] for r in _pairs(ws, "reference")]
    assert _rejects(ws, "p") == _rejects(ws, "reference")
