"""Exports on a real workspace with real image files.

Byte-exact captions through pandas and open_clip_train's CsvDataset, spreadsheet-safe cells, parquet/ids
content, manifests, materialised DICOM/tar images, atomicity.
"""

import csv
import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import skimage.data
from open_clip_train.data import CsvDataset
from PIL import Image

from chips_core.curation import export as ex
from chips_core.curation import selection as sel
from chips_core.workspace.store import Workspace

pytestmark = pytest.mark.unit

CAPTIONS = [
    "plain caption",
    'comma, "quoted" and more',
    "line one\nline two",
    "windows\r\nline end",
    "  leading and trailing spaces  ",
    "tab\tinside",
    "unicode: Zürich µm 肺 🫁",
    '=HYPERLINK("http://x")',
    "+1 formula",
    "-2 minus",
    "@SUM(A1)",
    "\tstarts with tab",
    "1e3",
    "NA",
]


def write_images(folder, n):
    """n small real PNG images (crops of scikit-image's bundled photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [skimage.data.camera(), skimage.data.astronaut(), skimage.data.coffee(), skimage.data.cell()]
    paths = []
    for i in range(n):
        arr = sources[i % len(sources)][i * 3 : i * 3 + 48, i * 5 : i * 5 + 48]
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def make_ws(tmp_path, filepaths, captions):
    """A workspace whose pool holds the given (filepath, caption) pairs, plus a ranking in file order."""
    ws = Workspace.init(tmp_path / "ws")
    ids = np.arange(len(filepaths), dtype=np.int64) * 1_000_003 - 4_000_000
    with ws.connect() as con:
        pool_id = ws.next_id(con)
        con.execute(
            "INSERT INTO pools (pool_id, name, kind, source, format, status) "
            "VALUES (?, 'pool', 'pool', 'test', 'csv', 'ready')",
            [pool_id],
        )
        for i, (fp, cap) in enumerate(zip(filepaths, captions, strict=True)):
            con.execute(
                "INSERT INTO pairs (pool_id, pair_id, row_index, filepath, caption, label) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [pool_id, int(ids[i]), i, fp, cap, "=label" if i == 0 else "ok"],
            )
    n = len(ids)
    ranking = pd.DataFrame(
        {
            "pair_id": ids,
            "alignment": np.linspace(1, -1, n),
            "learnability": np.linspace(0.1, 0.9, n),
            "relevance": np.full(n, 0.6),
            "score": np.linspace(2, -2, n),
            "rank": np.arange(1, n + 1),
        }
    )
    run = sel.record_score_run(ws, "pool", ranking, method="chips", params={"alpha": 0.7, "k": 64})
    return ws, ids, run


@pytest.fixture
def ws_all(tmp_path):
    paths = write_images(tmp_path / "imgs", len(CAPTIONS))
    ws, ids, run = make_ws(tmp_path, paths, CAPTIONS)
    sel.record_decision(ws, "pool", ids[-1], "include", note="-keep this")
    sid = sel.save_selection(ws, "pool", run, ratio=1.0, name="all")
    return ws, ids, sid, paths


def test_open_clip_csv_round_trips_captions_byte_exact(ws_all, tmp_path):
    ws, ids, sid, paths = ws_all
    out = tmp_path / "out" / "train.csv"
    info = ex.export_selection(ws, sid, "csv", out)
    assert info.path == out.resolve() and out.exists()
    assert info.open_clip_flags()[2:] == [
        "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title"
    ]  # fmt: skip
    # "NA" is read by pandas as a missing value: left out and recorded, never silently altered.
    assert [r["reason"] for r in info.rejected] == ["caption_not_csv_safe"]
    assert info.rejected[0]["pair_id"] == int(ids[-1])
    want = dict(zip(paths[:-1], CAPTIONS[:-1], strict=True))
    df = pd.read_csv(out, sep=",")
    assert dict(zip(df["filepath"], map(str, df["title"]), strict=True)) == want
    ds = CsvDataset(str(out), transforms=lambda im: np.asarray(im.convert("RGB")), img_key="filepath",
                    caption_key="title", sep=",", tokenizer=lambda texts: texts)  # fmt: skip
    assert len(ds) == len(CAPTIONS) - 1
    for i in range(len(ds)):
        image, caption = ds[i]
        assert caption.encode("utf-8") == want[ds.images[i]].encode("utf-8")
        assert np.array_equal(image, np.asarray(Image.open(ds.images[i]).convert("RGB")))
    manifest = json.loads(info.manifest_path.read_text(encoding="utf-8"))
    assert manifest["selection"]["name"] == "all" and manifest["score_run"]["params"]["k"] == 64
    assert manifest["decisions"]["include"] == [int(ids[-1])]
    assert manifest["rejected"] == info.rejected
    assert manifest["open_clip_train"][1] == str(out.resolve())
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT format, path FROM exports").fetchall() == [("csv", str(out.resolve()))]


def test_safe_csv_neutralises_formulas(ws_all, tmp_path):
    ws, ids, sid, _ = ws_all
    info = ex.export_selection(ws, sid, "safe-csv", tmp_path / "clin.csv")
    rows = list(csv.DictReader(io.StringIO(info.path.read_bytes().decode("utf-8-sig"), newline="")))
    assert len(rows) == len(CAPTIONS)  # rows are in rank order, which is CAPTIONS' order here
    for cap, row in zip(CAPTIONS, rows, strict=True):
        cell = row["caption"]
        if cap[0] in "=+-@\t\r":
            assert cell == "'" + cap
        else:
            assert cell == cap
    assert rows[0]["label"] == "'=label"
    assert next(r for r in rows if r["pair_id"] == str(ids[-1]))["note"] == "'-keep this"
    assert float(rows[0]["score"]) == pytest.approx(2.0)


def test_parquet_and_ids(ws_all, tmp_path):
    ws, ids, sid, _ = ws_all
    sel.record_decision(ws, "pool", ids[0], "exclude")
    sid2 = sel.save_selection(ws, "pool", sel.get_selection(ws, sid).score_run_id, ratio=0.5, name="half")
    pq = ex.export_selection(ws, sid2, "parquet", tmp_path / "half.parquet")
    df = pd.read_parquet(pq.path)
    for col in (
        "pair_id",
        "rank",
        "source",
        "filepath",
        "caption",
        "alignment",
        "learnability",
        "relevance",
        "score",
    ):
        assert col in df.columns
    assert ids[0] not in set(df["pair_id"]) and len(df) == 7
    assert list(df["rank"]) == sorted(df["rank"])
    npy = ex.export_selection(ws, "half", "ids", tmp_path)
    assert npy.path.name == "half-v1.npy"
    arr = np.load(npy.path)
    assert arr.dtype == np.int64 and list(arr) == list(df["pair_id"])
    assert json.loads(npy.manifest_path.read_text())["n_rows"] == 7


def test_dicom_and_tar_members_are_materialised(tmp_path):
    import pydicom.data

    from chips_core.pools.records import load_image

    dcm = pydicom.data.get_testdata_file("CT_small.dcm")
    png = write_images(tmp_path / "imgs", 1)[0]
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(png, arcname="x0001.png")
    deep = tmp_path / "deep.png"  # 16-bit greyscale: PIL mode I;16, clipped by a plain convert("RGB")
    Image.fromarray(skimage.data.camera()[:64, :64].astype(np.uint16) * 200).save(deep)
    refs = [str(dcm), f"{shard}::x0001.png", str(deep), png]
    ws, ids, run = make_ws(tmp_path, refs, ["ct slice", "tar member", "16-bit", "plain file"])
    sid = sel.save_selection(ws, "pool", run, ratio=1.0, name="mixed")
    info = ex.export_selection(ws, sid, "csv", tmp_path / "exp" / "mixed.csv")
    assert info.materialised == 3
    df = pd.read_csv(info.path)
    assert df["filepath"].iloc[3] == png
    for ref, path in zip(refs[:3], df["filepath"].iloc[:3], strict=True):
        assert path.startswith(str(tmp_path / "exp" / "mixed_images"))
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(load_image(ref)))


def test_failed_export_leaves_nothing(ws_all, tmp_path, monkeypatch):
    ws, ids, sid, paths = ws_all
    out = tmp_path / "keep.csv"
    ex.export_selection(ws, sid, "safe_csv", out)
    before = out.read_bytes()

    def broken(table, tmp):
        tmp.write_text("partial row,")
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_write_safe_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        ex.export_selection(ws, sid, "safe_csv", out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM exports").fetchone()[0] == 1


def test_missing_image_fails_cleanly(tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    ws, ids, run = make_ws(tmp_path, [paths[0], str(tmp_path / "gone.png")], ["a", "b"])
    sid = sel.save_selection(ws, "pool", run, ratio=1.0, name="s")
    with pytest.raises(ex.ExportError, match="gone.png"):
        ex.export_selection(ws, sid, "csv", tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()
    with pytest.raises(ex.ExportError, match="unknown export format"):
        ex.export_selection(ws, sid, "xlsx", tmp_path / "o.xlsx")


def test_manifest_names_model_and_cache(tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    ws, ids, _ = make_ws(tmp_path, paths, ["a", "b", "c"])
    with ws.connect() as con:
        con.execute(
            "INSERT INTO models (model_id, name, pretrained) "
            "VALUES (900, 'chips-tiny-vit', 'random-init:seed=0')"
        )
        con.execute(
            "INSERT INTO feature_runs (run_id, pool_id, model_id, status, dir) "
            "SELECT 901, pool_id, 900, 'done', '/x' FROM pools"
        )
        con.execute(
            "INSERT INTO scoring_caches (cache_id, pool_run_id, eval_run_id, config, dir, status) "
            "VALUES (902, 901, 901, '{\"k_max\": 64}', '/caches/902', 'done')"
        )
    ranking = pd.DataFrame({"pair_id": ids, "score": [3.0, 2.0, 1.0], "rank": [1, 2, 3]})
    sid = sel.save_selection(ws, "pool", ranking, 0.5, "m", params={"cache_id": 902, "alpha": 0.7})
    info = ex.export_selection(ws, sid, "ids", tmp_path / "m.npy")
    manifest = json.loads(info.manifest_path.read_text())
    assert manifest["model"]["name"] == "chips-tiny-vit" and manifest["model"]["feature_run_id"] == 901
    assert manifest["scoring_cache"]["config"] == {"k_max": 64}
    assert manifest["score_run"]["params"]["alpha"] == 0.7
    assert list(np.load(info.path)) == list(ids[:2])


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_export_bytes_are_the_file_the_export_writes(ws_all, fmt):
    """A browser download holds the very bytes `export_selection` writes, and writes no export itself."""
    ws, ids, sid, _ = ws_all
    got = ex.export_bytes(ws, sid, fmt)
    with ws.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM exports").fetchone()[0] == 0
    default = ex.default_path(ws, sel.get_selection(ws, sid), fmt)
    assert not default.exists()
    written = ex.export_selection(ws, sid, fmt)
    assert written.path == default.resolve() and got.file_name == default.name
    assert got.data == written.path.read_bytes() and got.n_rows == written.n_rows
    assert got.rejected == written.rejected


def test_export_bytes_of_materialised_images_and_failures(tmp_path, monkeypatch):
    png = write_images(tmp_path / "imgs", 1)[0]
    deep = tmp_path / "deep.png"  # 16-bit: materialised beside the default path, where the export puts it
    Image.fromarray(skimage.data.camera()[:64, :64].astype(np.uint16) * 200).save(deep)
    ws, ids, run = make_ws(tmp_path, [str(deep), png], ["16-bit", "plain"])
    sid = sel.save_selection(ws, "pool", run, ratio=1.0, name="deep")
    got = ex.export_bytes(ws, sid, "csv")
    df = pd.read_csv(io.BytesIO(got.data))
    assert df["filepath"].iloc[0].startswith(str(ws.root / "exports" / "deep-v1_images"))
    assert Image.open(df["filepath"].iloc[0]).size == (64, 64)
    assert got.data == ex.export_selection(ws, sid, "csv").path.read_bytes()

    def broken(table, tmp):
        tmp.write_text("partial row,")
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_write_safe_csv", broken)
    monkeypatch.setattr(ex.tempfile, "tempdir", str(tmp_path / "private-tmp"))
    (tmp_path / "private-tmp").mkdir()
    with pytest.raises(OSError, match="disk full"):
        ex.export_bytes(ws, sid, "safe_csv")
    assert list((tmp_path / "private-tmp").iterdir()) == []  # the temporary folder is gone
    with pytest.raises(ex.ExportError, match="unknown export format"):
        ex.export_bytes(ws, sid, "xlsx")
