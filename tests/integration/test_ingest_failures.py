"""Issue 9: failed ingests (status, exit code, --replace, `chips rm`), non-UTF-8 sources (--encoding) and
image paths outside the source's folder (outside_root, --allow-outside). Real files in tmp_path, a real DuckDB
workspace, the real command line in subprocesses; no mocks."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_build import make_dicom_pool, make_wds_pool, real_images, write_images

from chips_core.pools.ingest import IngestError, ingest
from chips_core.pools.records import PoolError, pair_id, read_image_bytes
from chips_core.workspace.store import Workspace

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
LATIN = ["Röntgen Thorax p.a., Läsion größer", "coupe axiale, lésion hépatique, artère", "café au lait, 5 µm"]


def chips(*args, timeout=300):
    """The real command line in a fresh process (CompletedProcess; the caller checks the exit status)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CHIPS_PROGRESS": "0"}
    env.pop("CHIPS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "chips_core.cli", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_line_error(proc, *needles):
    """Exit status 1 and exactly one stderr line that names every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def pools(ws_root) -> dict[str, dict]:
    proc = chips("status", ws_root, "--json")
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)["pools"]}


def q(ws: Workspace, sql: str, args=()) -> list[tuple]:
    with ws.connect(read_only=True) as con:
        return con.execute(sql, list(args)).fetchall()


def rejects(ws: Workspace, name: str) -> dict[str, tuple[str, str]]:
    rows = q(
        ws, "SELECT source_ref, reason, detail FROM rejects JOIN pools USING (pool_id) WHERE name = ?", [name]
    )
    return {ref: (reason, detail) for ref, reason, detail in rows}


def captions(ws: Workspace, name: str) -> list[tuple[int, str, str]]:
    return q(
        ws,
        "SELECT pair_id, filepath, caption FROM pairs JOIN pools USING (pool_id) WHERE name = ? "
        "ORDER BY row_index",
        [name],
    )


def write_manifest(path: Path, rows: list[tuple[str, str]], header=("filepath", "title"), encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


# --- 2. failed ingests ------------------------------------------------------------------------------------


def test_wrong_columns_leave_no_pool_and_the_advised_flags_then_work(ws, tmp_path):
    items = write_images(tmp_path / "src" / "images", 3)
    rows = [(f"images/{p.name}", c) for p, c, _ in items]
    manifest = write_manifest(tmp_path / "src" / "m.csv", rows, header=("path", "text"))
    line = one_line_error(chips("ingest", ws.root, "p", manifest), manifest, "--image-col", "missing column")
    assert "Traceback" not in line
    assert pools(ws.root) == {}, "a refused source must not leave an 'ingesting' pool behind"
    ok = chips("ingest", ws.root, "p", manifest, "--image-col", "path", "--caption-col", "text")
    assert ok.returncode == 0, ok.stderr
    assert "3 pairs, 0 rejected" in ok.stdout
    assert pools(ws.root)["p"]["status"] == "ready"


def test_empty_and_header_only_manifests_are_refused_without_a_pool(ws, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    one_line_error(chips("ingest", ws.root, "e", empty), empty, "empty")
    header_only = write_manifest(tmp_path / "header.csv", [])
    one_line_error(chips("ingest", ws.root, "h", header_only), header_only, "no records")
    assert pools(ws.root) == {}


def test_all_rejected_exits_1_marks_failed_then_retry_and_replace_work(ws, tmp_path):
    src = tmp_path / "src"
    items = real_images(4)
    manifest = write_manifest(
        src / "pool.csv", [(f"images/img_{i:04d}.png", c) for i, (_, c, _) in enumerate(items)]
    )
    proc = chips("ingest", ws.root, "p", manifest, "--workers", 0)
    line = one_line_error(proc, manifest, "no pairs kept", "4 missing_file", "chips rm")
    assert "0 pairs, 4 rejected" in proc.stdout  # the summary is printed before the error
    info = pools(ws.root)["p"]
    assert info["status"] == "failed" and info["rejects"] == 4 and info["pairs"] == 0
    assert info["error"] == line.split(": ", 1)[1]
    # the same command again, after the images are there: retried from scratch
    write_images(src / "images", 4)
    again = chips("ingest", ws.root, "p", manifest, "--workers", 0)
    assert again.returncode == 0, again.stderr
    assert "4 pairs, 0 rejected" in again.stdout
    info = pools(ws.root)["p"]
    assert (info["status"], info["pairs"], info["rejects"], info["error"]) == ("ready", 4, 0, None)
    # other options: refused without --replace (naming it), replaced with it
    one_line_error(chips("ingest", ws.root, "p", manifest, "--caption-col", "filepath"), "--replace")
    replaced = chips(
        "ingest", ws.root, "p", manifest, "--caption-col", "filepath", "--replace", "--workers", 0
    )
    assert replaced.returncode == 0, replaced.stderr
    assert "replaces the earlier pool" in replaced.stdout
    new = pools(ws.root)["p"]
    assert new["pool_id"] != info["pool_id"] and new["pairs"] == 4
    assert q(ws, "SELECT count(*) FROM pairs")[0][0] == 4  # the old pool's rows are gone


def test_a_failed_pool_is_replaced_by_the_advised_flags(ws, tmp_path):
    """Every row outside the manifest's folder: exit 1 naming --allow-outside; the same name with that flag
    then replaces the failed pool (no --replace needed: a failed pool holds no pair)."""
    outside = write_images(tmp_path / "shared", 2)
    manifest = write_manifest(tmp_path / "lists" / "m.csv", [(str(p), c) for p, c, _ in outside])
    first = chips("ingest", ws.root, "p", manifest, "--workers", 0)
    one_line_error(first, manifest, "2 outside_root", "--allow-outside")
    assert pools(ws.root)["p"]["status"] == "failed"
    again = chips("ingest", ws.root, "p", manifest, "--workers", 0, "--allow-outside", tmp_path / "shared")
    assert again.returncode == 0, again.stderr
    assert "2 pairs, 0 rejected" in again.stdout and "replaces the earlier pool" in again.stdout
    assert pools(ws.root)["p"]["status"] == "ready"


def test_ctrl_c_leaves_a_resumable_interrupted_pool(ws, tmp_path):
    items = write_images(tmp_path / "images", 24)
    manifest = write_manifest(tmp_path / "m.csv", [(f"images/{p.name}", c) for p, c, _ in items])
    code = (
        "import time\nfrom chips_core.workspace.store import Workspace\nfrom chips_core.pools.ingest import "
        "ingest\n"
        f"ingest(Workspace({str(ws.root)!r}), 'p', {str(manifest)!r}, workers=0, chunk_size=4,\n"
        "       progress=lambda done, total: (print(done, flush=True), time.sleep(0.5)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "4"  # the first chunk is committed
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    status, n = q(ws, "SELECT status, (SELECT count(*) FROM pairs) FROM pools WHERE name = 'p'")[0]
    assert status == "interrupted" and 4 <= n < 24
    s = ingest(ws, "p", manifest, workers=0)
    assert s.resumed_from > 0 and s.n_pairs == 24 and s.status == "ready"


def test_library_raises_ingest_error_with_the_summary(ws, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [("images/nothing.png", "a caption")])
    with pytest.raises(IngestError, match="no pairs kept") as err:
        ingest(ws, "p", manifest, workers=0)
    assert err.value.summary.status == "failed" and err.value.summary.reject_counts == {"missing_file": 1}
    assert q(ws, "SELECT status FROM pools WHERE name = 'p'") == [("failed",)]


def test_rm_refuses_with_dependents_and_force_removes_them(ws, tmp_path):
    from chips_core.features.featurize import featurize

    pool_m = write_manifest(
        tmp_path / "pool" / "pool.csv",
        [(str(p), c) for p, c, _ in write_images(tmp_path / "pool" / "images", 12, seed=1)],
    )
    eval_m = write_manifest(
        tmp_path / "eval" / "eval.csv",
        [(str(p), c) for p, c, _ in write_images(tmp_path / "eval" / "images", 6, seed=2)],
    )

    ingest(ws, "pool", pool_m, workers=0)
    ingest(ws, "target", eval_m, kind="eval", workers=0)
    for name in ("pool", "target"):
        featurize(ws, name, "chips-tiny-vit", device="cpu")
    prep = ["--k-max", "16", "--batch-size", "4", "--device", "cpu", "--curvature-pairs", "12"]
    for argv in (
        ["score", ws.root, "pool", "--eval", "target", "--ratio", "0.5", *prep],
        ["select", ws.root, "pool", "--ratio", "0.5", "--name", "half"],
        ["export", ws.root, "half", "--format", "csv"],
        ["decide", ws.root, "pool", str(captions(ws, "pool")[0][0]), "exclude"],
    ):
        proc = chips(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
    run_dirs = [Path(d) for (d,) in q(ws, "SELECT dir FROM feature_runs")]
    cache_dirs = [Path(d) for (d,) in q(ws, "SELECT dir FROM scoring_caches")]
    score_files = [Path(p) for (p,) in q(ws, "SELECT result_path FROM score_runs")]
    (export,) = [Path(p) for (p,) in q(ws, "SELECT path FROM exports")]
    assert all(p.exists() for p in run_dirs + cache_dirs + score_files + [export])

    line = one_line_error(chips("rm", ws.root, "pool"), "pool", "--force")
    for what in (
        "feature runs",
        "scoring caches",
        "score runs",
        "selections (half@1)",
        "exports",
        "decisions",
    ):
        assert what in line, (what, line)
    assert set(pools(ws.root)) == {"pool", "target"}  # nothing removed
    one_line_error(chips("ingest", ws.root, "pool", pool_m, "--replace"), "cannot be replaced", "chips rm")

    done = chips("rm", ws.root, "pool", "--force")
    assert done.returncode == 0, done.stderr
    assert "removed pool 'pool'" in done.stdout
    assert set(pools(ws.root)) == {"target"}
    for table in (
        "pairs",
        "rejects",
        "scoring_caches",
        "score_runs",
        "selections",
        "selection_members",
        "exports",
        "decisions",
    ):
        n = q(ws, f"SELECT count(*) FROM {table}")[0][0]
        assert n == (6 if table == "pairs" else 0), table  # the eval set's 6 pairs stay
    (target_run,) = q(ws, "SELECT run_id, dir FROM feature_runs")  # the eval set's own run stays
    assert Path(target_run[1]).exists()
    removed = [p for p in run_dirs + cache_dirs + score_files + [export] if p != Path(target_run[1])]
    assert not [p for p in removed if p.exists()], "files of removed records are left"
    assert not Path(f"{export}.manifest.json").exists()
    one_line_error(chips("rm", ws.root, "pool"), "no pool named 'pool'")


def test_rm_of_a_failed_pool_needs_no_force(ws, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [("images/nothing.png", "a caption")])
    assert chips("ingest", ws.root, "p", manifest, "--workers", 0).returncode == 1
    proc = chips("rm", ws.root, "p")
    assert proc.returncode == 0, proc.stderr
    assert "0 pairs, 1 rejects" in proc.stdout
    assert pools(ws.root) == {} and q(ws, "SELECT count(*) FROM rejects") == [(0,)]


# --- 3. encodings -----------------------------------------------------------------------------------------


def test_latin1_csv_is_detected_reported_recorded_and_stored_as_utf8(ws, tmp_path):
    items = write_images(tmp_path / "src" / "images", 3)
    rows = [(f"images/{p.name}", LATIN[i]) for i, (p, _, _) in enumerate(items)]
    manifest = write_manifest(tmp_path / "src" / "pool.csv", rows, encoding="cp1252")
    proc = chips("ingest", ws.root, "p", manifest, "--workers", 0)
    assert proc.returncode == 0, proc.stderr
    assert "3 pairs, 0 rejected" in proc.stdout and "encoding cp1252 (detected)" in proc.stdout
    assert pools(ws.root)["p"]["encoding"] == "cp1252 (detected)"
    got = captions(ws, "p")
    assert [c for _, _, c in got] == LATIN
    for pid, path, caption in got:  # the pair_id hashes the caption's UTF-8 bytes, not the file's
        assert pid == pair_id(read_image_bytes(path), caption)
    # the same text from a UTF-8 file gives the same pair ids
    utf8 = write_manifest(tmp_path / "src" / "utf8.csv", rows)
    ingest(ws, "u", utf8, workers=0)
    assert [pid for pid, _, _ in captions(ws, "u")] == [pid for pid, _, _ in got]


def test_utf16_manifest_with_a_byte_order_mark(ws, tmp_path):
    items = write_images(tmp_path / "images", 3)
    rows = [(f"images/{p.name}", LATIN[i] + " 肺") for i, (p, _, _) in enumerate(items)]
    manifest = write_manifest(tmp_path / "pool.csv", rows, encoding="utf-16")
    s = ingest(ws, "p", manifest, workers=0)
    assert (s.n_pairs, s.encoding) == (3, "utf-16 (byte order mark)")
    assert [c for _, _, c in captions(ws, "p")] == [c for _, c in rows]


def test_encoding_flag_given_wrong_unknown_or_not_applicable(ws, tmp_path):
    items = write_images(tmp_path / "src" / "images", 2)
    rows = [(f"images/{p.name}", LATIN[i]) for i, (p, _, _) in enumerate(items)]
    manifest = write_manifest(tmp_path / "src" / "pool.csv", rows, encoding="latin-1")
    s = ingest(ws, "given", manifest, encoding="latin-1", workers=0)
    assert s.n_pairs == 2 and s.encoding == "iso8859-1 (given)"
    assert [c for _, _, c in captions(ws, "given")] == LATIN[:2]
    proc = chips("ingest", ws.root, "strict", manifest, "--encoding", "utf-8", "--workers", 0)
    one_line_error(proc, manifest, "2 undecodable_caption", "utf-8")
    assert {r for r, _ in rejects(ws, "strict").values()} == {"undecodable_caption"}
    one_line_error(chips("ingest", ws.root, "x", manifest, "--encoding", "klingon"), "--encoding", "klingon")
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"filepath": [str(items[0][0])], "title": ["x"]}), table)
    one_line_error(chips("ingest", ws.root, "y", table, "--encoding", "cp1252"), "--encoding", "parquet")


def test_latin1_sidecars_and_wds_txt_members_are_decoded(ws, tmp_path):
    folder = tmp_path / "folder"
    for (path, _, _), text in zip(write_images(folder, 3), LATIN, strict=True):
        path.with_suffix(".txt").write_bytes(text.encode("cp1252") + b"\n")
    assert ingest(ws, "f", folder, workers=0).n_pairs == 3
    assert [c for _, _, c in captions(ws, "f")] == LATIN
    shard = tmp_path / "wds" / "shard-00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for i, ((path, _, _), text) in enumerate(zip(write_images(tmp_path / "wimg", 3), LATIN, strict=True)):
            for ext, data in (("png", path.read_bytes()), ("txt", text.encode("latin-1"))):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    assert ingest(ws, "w", shard, workers=0).n_pairs == 3
    assert [c for _, _, c in captions(ws, "w")] == LATIN


# --- 4. paths outside the source's folder -----------------------------------------------------------------


def test_manifest_paths_outside_its_folder_are_rejected_unopened(ws, tmp_path):
    src = tmp_path / "src"
    good = write_images(src / "images", 2)
    outside = write_images(tmp_path / "outside", 2, seed=5)
    (src / "images" / "linked.png").symlink_to(outside[1][0])
    fifo_dir = tmp_path / "fifos"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "blocks.png")  # opening it would block the ingest forever
    rows = [(f"images/{p.name}", c) for p, c, _ in good] + [
        (f"../outside/{outside[0][0].name}", "dot-dot path to a real image"),
        ("/etc/passwd", "a system file"),
        ("images/linked.png", "a symlink to an image outside"),
        ("../fifos/blocks.png", "a named pipe outside"),
    ]
    manifest = write_manifest(src / "pool.csv", rows)
    proc = chips("ingest", ws.root, "p", manifest, "--workers", 0, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 pairs, 4 rejected" in proc.stdout and "outside_root" in proc.stdout
    got = rejects(ws, "p")
    assert {int(ref.rsplit("row ", 1)[1]): r for ref, (r, _) in got.items()} == {
        3: "outside_root",
        4: "outside_root",
        5: "outside_root",
        6: "outside_root",
    }
    for ref, (_, detail) in got.items():
        assert detail.startswith(ref) and "--allow-outside" in detail and str(src) in detail
    allowed = chips(
        "ingest", ws.root, "a", manifest, "--workers", 0, "--allow-outside", tmp_path / "outside", timeout=120
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "4 pairs, 2 rejected" in allowed.stdout
    assert sorted(r for r, _ in rejects(ws, "a").values()) == ["outside_root", "outside_root"]  # passwd, fifo
    one_line_error(
        chips("ingest", ws.root, "b", manifest, "--allow-outside", tmp_path / "nope"), "--allow-outside"
    )


def test_parquet_folder_wds_and_dicom_paths_outside_are_rejected(ws, tmp_path):
    outside = write_images(tmp_path / "outside", 3, seed=7)
    # parquet manifest with a ../ path
    pq_dir = tmp_path / "pq"
    inside = write_images(pq_dir / "images", 1)
    pq.write_table(
        pa.table(
            {
                "filepath": [str(inside[0][0]), f"../outside/{outside[0][0].name}"],
                "title": ["inside", "outside"],
            }
        ),
        pq_dir / "pool.parquet",
    )
    s = ingest(ws, "pq", pq_dir / "pool.parquet", workers=0)
    assert (s.n_pairs, s.reject_counts) == (1, {"outside_root": 1})
    # folder: a symlinked image, and a symlinked sidecar pointing at a system file
    folder = tmp_path / "folder"
    for path, caption, _ in write_images(folder, 2):
        path.with_suffix(".txt").write_text(caption)
    (folder / "link.png").symlink_to(outside[1][0])
    (folder / "link.txt").write_text("a linked image")
    (folder / "img_0001.txt").unlink()
    (folder / "img_0001.txt").symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/etc/passwd")
    s = ingest(ws, "folder", folder, workers=0)
    assert (s.n_pairs, s.reject_counts) == (1, {"outside_root": 2})
    s = ingest(ws, "folder2", folder, workers=0, allow_outside=[tmp_path / "outside"])
    assert (s.n_pairs, s.reject_counts) == (2, {"outside_root": 1})  # the sidecar into /etc stays out
    # WebDataset folder with a symlinked shard
    wds = make_wds_pool(tmp_path / "w", n=4, shards=1)
    elsewhere = make_wds_pool(tmp_path / "elsewhere", n=2, shards=1)
    (wds / "shard-00009.tar").symlink_to(elsewhere / "shard-00000.tar")
    s = ingest(ws, "wds", wds, workers=0)
    assert (s.n_pairs, s.reject_counts) == (4, {"outside_root": 1})
    # DICOM folder with a symlinked file
    dicom = make_dicom_pool(tmp_path / "d", names=("CT_small.dcm",))
    other = make_dicom_pool(tmp_path / "other", names=("MR_small.dcm",))
    (dicom / "linked.dcm").symlink_to(other / "MR_small.dcm")
    s = ingest(ws, "dicom", dicom, workers=0)
    assert (s.n_pairs, s.reject_counts) == (1, {"outside_root": 1})


def test_pools_that_failed_before_this_change_can_be_retried(ws, tmp_path):
    """A pool left 'ready' with 0 pairs (or 'ingesting') by an older version: the same ingest retries it."""
    items = write_images(tmp_path / "images", 2)
    manifest = write_manifest(tmp_path / "m.csv", [(f"images/{p.name}", c) for p, c, _ in items])
    with ws.connect() as con:
        con.execute(
            "INSERT INTO pools (pool_id, name, kind, source, format, options, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                ws.next_id(con),
                "old",
                "pool",
                str(manifest),
                "csv",
                json.dumps(
                    {
                        "image_col": "filepath",
                        "caption_col": "title",
                        "label_col": None,
                        "sep": None,
                        "next_row": 2,
                    }
                ),
                "ready",
            ],
        )
    s = ingest(ws, "old", manifest, workers=0)
    assert s.n_pairs == 2 and s.status == "ready"
    with pytest.raises(PoolError, match="--replace"):
        ingest(ws, "old", manifest, caption_col="filepath")
