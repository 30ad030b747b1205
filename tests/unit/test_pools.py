"""Readers, image loading, DICOM display conversion, validation and the pair_id contract (real files only)."""

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures_build import (
    make_bad_pool,
    make_csv_pool,
    make_dicom_pool,
    make_folder_pool,
    make_parquet_pool,
    make_wds_pool,
    png_bomb_bytes,
    real_images,
)
from PIL import Image
from pydicom.data import get_testdata_file

from chips_core.pools import dicom as pools_dicom
from chips_core.pools import records
from chips_core.pools.readers import ReaderOptions, detect_format, iter_records
from chips_core.pools.records import ImageLoadError, PoolError, Record, check_record, load_image, pair_id
from chips_core.pools.wds import wds_shards

pytestmark = pytest.mark.unit


def _records(source, fmt, **kw) -> list[Record]:
    return list(iter_records(str(source), fmt, ReaderOptions(**kw)))


# --- pair_id ---------------------------------------------------------------------------------------------


def test_pair_id_follows_the_contract_and_is_stable():
    image, caption = b"\x89PNG fake bytes", "CT of the chest, axial \u00e9"
    digest = hashlib.blake2b(
        hashlib.sha256(image).digest() + b"\0" + caption.encode("utf-8"), digest_size=8
    ).digest()
    assert pair_id(image, caption) == int.from_bytes(digest, "little", signed=True)
    # Golden values: the same on every machine and run (changing them breaks every stored workspace).
    assert pair_id(b"abc", "x") == -8027775286923891188
    assert pair_id(b"abc", "y") != pair_id(b"abc", "x")
    assert pair_id(b"abd", "x") != pair_id(b"abc", "x")
    assert -(2**63) <= pair_id(b"", "") < 2**63


# --- load_image --------------------------------------------------------------------------------------------


def test_load_image_plain_files_and_modes(tmp_path):
    (im, _, _) = real_images(1, size=40)[0]
    for fmt in ("png", "jpeg", "bmp", "tiff"):
        path = tmp_path / f"x.{fmt}"
        im.save(path)
        out = load_image(str(path))
        assert out.mode == "RGB" and out.size == (40, 40)
    grey16 = Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))
    grey16.save(tmp_path / "g16.png")
    out = np.asarray(load_image(str(tmp_path / "g16.png")))
    assert out.shape == (40, 40, 3) and out.min() == 0 and out.max() == 255  # scaled, not clipped


def test_load_image_tar_member_with_cached_index_invalidated_on_rewrite(tmp_path):
    shards = wds_shards(str(make_wds_pool(tmp_path, n=4, shards=1)))
    ref = f"{shards[0]}::sample000002.jpg"
    a = np.asarray(load_image(ref))
    expected = np.asarray(Image.open(io.BytesIO(_member(shards[0], "sample000002.jpg"))).convert("RGB"))
    assert np.array_equal(a, expected)
    # Rewrite the shard with different content: the per-process index must not serve stale offsets.
    other = real_images(3, size=50, seed=7)[2][0]
    buf = io.BytesIO()
    other.save(buf, format="PNG")
    with tarfile.open(shards[0], "w") as tf:
        for name, data in (("pad.txt", b"x" * 3000), ("sample000002.jpg", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert load_image(ref).size == (50, 50)
    with pytest.raises(ImageLoadError) as err:
        load_image(f"{shards[0]}::nope.jpg")
    assert err.value.reason == "missing_file" and "nope.jpg" in str(err.value)


def _member(shard: str, name: str) -> bytes:
    with tarfile.open(shard) as tf:
        return tf.extractfile(name).read()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "missing_file"),
        (b"", "zero_bytes"),
        (b"not an image at all", "corrupt_image"),
        (png_bomb_bytes(), "decompression_bomb"),
    ],
)
def test_load_image_errors_carry_reason_and_name(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError) as err:
        load_image(str(path))
    assert err.value.reason == reason and str(path) in str(err.value)


# --- DICOM -------------------------------------------------------------------------------------------------


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_dicom_monochrome1_is_inverted_monochrome2():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mono2 = pools_dicom.decode(_dicom_bytes(ds)).pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = pools_dicom.decode(_dicom_bytes(ds)).pixels
    assert mono2.dtype == np.uint8 and mono2.min() == 0 and mono2.max() == 255
    assert np.array_equal(mono1, 255 - mono2)


def test_dicom_modality_lut_and_voi_window_applied():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for kw in ("WindowCenter", "WindowWidth"):
        if kw in ds:
            del ds[kw]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window in HU
    out = pools_dicom.decode(_dicom_bytes(ds)).pixels.astype(np.float64)
    hu = ds.pixel_array.astype(np.float64) - 1024  # modality LUT by hand
    # DICOM linear window (PS3.3 C.11.2.1.2.1), mapped to 0..255.
    expected = np.clip(((hu - (40 - 0.5)) / (400 - 1) + 0.5), 0, 1) * 255
    assert np.abs(out - expected).max() <= 1.0
    assert (out == 0).any() and (out == 255).any()  # the window saturates on both sides


def test_dicom_multiframe_uses_middle_frame_and_colour_files_decode():
    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    out = pools_dicom.decode(Path(path).read_bytes()).pixels
    middle = pools_dicom.scale_to_uint8(arr[len(arr) // 2])
    assert out.shape == arr.shape[1:] and np.array_equal(out, middle)
    for name in ("SC_rgb.dcm", "examples_palette.dcm", "SC_rgb_16bit.dcm"):
        im = load_image(get_testdata_file(name))
        assert im.mode == "RGB" and np.asarray(im).std() > 0


def test_dicom_caption_template():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = "  brain   MRI "
    data = _dicom_bytes(ds)
    assert pools_dicom.decode(data, pools_dicom.DEFAULT_TEMPLATE).caption == "MR HEAD brain MRI"
    assert pools_dicom.decode(data, "{Modality} scan, {NoSuchKeyword}.").caption == "MR scan, ."
    with pytest.raises(ValueError, match="template"):
        pools_dicom.check_template("{Modality")
    with pytest.raises(ValueError, match="keywords"):
        pools_dicom.check_template("{0} {a.b}")


def test_bad_dicom_is_rejected_with_reason(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopix.dcm"
    ds.save_as(path)
    rec = Record(0, str(path), str(path), None, caption_template="{Modality}")
    out = check_record(rec)
    assert out.reason == "bad_dicom" and "no pixel data" in out.detail and out.pair_id is None


# --- readers -----------------------------------------------------------------------------------------------


def test_detect_format(tmp_path):
    assert detect_format(str(make_csv_pool(tmp_path, n=2))) == "csv"
    assert detect_format(str(make_csv_pool(tmp_path / "t", n=2, sep="\t"))) == "tsv"
    assert detect_format(str(make_parquet_pool(tmp_path, n=2))) == "parquet"
    assert detect_format(str(make_folder_pool(tmp_path, n=2))) == "folder"
    wds = make_wds_pool(tmp_path, n=2, shards=1)
    assert detect_format(str(wds)) == detect_format(str(wds / "shard-00000.tar")) == "wds"
    assert detect_format(str(wds / "shard-{00000..00000}.tar")) == "wds"
    assert detect_format(str(make_dicom_pool(tmp_path, names=("CT_small.dcm",)))) == "dicom"
    with pytest.raises(PoolError, match="does not exist"):
        detect_format(str(tmp_path / "nothing"))
    (tmp_path / "x.bin").write_bytes(b"123")
    with pytest.raises(PoolError, match="x.bin"):
        detect_format(str(tmp_path / "x.bin"))


def test_csv_relative_paths_and_separator_sniffing(tmp_path):
    manifest = make_csv_pool(tmp_path, n=3)
    recs = _records(manifest, "csv", label_col="label")
    assert [r.image_ref for r in recs] == [
        str(manifest.parent / "images" / f"img_{i:04d}.png") for i in range(3)
    ]
    assert recs[0].label == "retina" and recs[0].source_ref == f"{manifest}:row 1"
    # open_clip's own default is tab-separated with a .csv name: sniffed from the header.
    tabbed = manifest.parent / "tabbed.csv"
    with open(manifest, newline="") as f, open(tabbed, "w", newline="") as g:
        csv.writer(g, delimiter="\t").writerows(csv.reader(f))
    recs_tab = _records(tabbed, "csv", label_col="label")
    assert [(r.image_ref, r.caption) for r in recs_tab] == [(r.image_ref, r.caption) for r in recs]


def test_csv_missing_column_is_a_clear_error(tmp_path):
    manifest = make_csv_pool(tmp_path, n=2)
    with pytest.raises(PoolError, match=r"missing column\(s\) \['image'\].*filepath"):
        _records(manifest, "csv", image_col="image")


def test_csv_captions_byte_exact_and_malformed_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    tricky = 'quote " comma , newline\nand unicode \u00e9\u4e2d  '
    text = 'filepath,title\na.png,"' + tricky.replace('"', '""') + '"\n\na.png,x,extra\n'
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    recs = _records(tmp_path / "m.csv", "csv")
    assert recs[0].caption == tricky and recs[0].reject is None
    assert recs[1].reject[0] == "malformed_row" and "row 2" in recs[1].reject[1]


def test_parquet_custom_columns(tmp_path):
    path = make_parquet_pool(tmp_path, n=3, image_col="img", caption_col="txt")
    recs = _records(path, "parquet", image_col="img", caption_col="txt", label_col="label")
    assert len(recs) == 3 and all(Path(r.image_ref).is_file() for r in recs) and recs[2].label == "ihc"


def test_folder_sidecars(tmp_path):
    folder = make_folder_pool(tmp_path, n=3)
    (folder / "img_0001.txt").write_bytes(b"\xff\xfe bad utf-8")
    (folder / "img_0002.txt").unlink()
    recs = _records(folder, "folder")
    assert recs[0].caption == "fundus photograph of the retina, upper left crop 0"  # trailing newline dropped
    assert recs[1].reject[0] == "undecodable_caption" and "img_0001.txt" in recs[1].reject[1]
    assert recs[2].reject[0] == "missing_caption" and "img_0002.txt" in recs[2].reject[1]


def test_wds_json_caption_key_brace_pattern_and_broken_shard(tmp_path):
    folder = make_wds_pool(tmp_path, n=6, shards=3, caption="json")
    recs = _records(folder / "shard-{00000..00002}.tar", "wds", label_col="label")
    assert len(recs) == 6 and recs[1].caption.startswith("phase contrast") and recs[1].label == "cell"
    assert recs[0].image_ref == f"{folder / 'shard-00000.tar'}::sample000000.jpg" and recs[0].byte_range
    assert _records(folder, "wds", json_caption_key="other")[0].reject[0] == "missing_caption"
    # A truncated shard: the samples before the break survive, the break itself is one reject.
    shard = folder / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[:1700])
    recs = _records(folder, "wds")
    reasons = [r.reject[0] if r.reject else check_record(r).reason for r in recs]
    assert reasons[:2] == [None, None] and reasons[-2:] == [None, None]
    assert set(reasons[2:-2]) <= {"unreadable_file", "truncated_image", "missing_file"} and reasons[2:-2]
    missing = _records(folder / "shard-{00000..00009}.tar", "wds")
    assert sum(r.reject is not None and r.reject[0] == "missing_file" for r in missing) == 7


def test_check_record_valid_pair_id_matches_bytes(tmp_path):
    manifest = make_csv_pool(tmp_path, n=2, fmt="jpg")
    rec = _records(manifest, "csv")[1]
    out = check_record(rec)
    assert out.reason is None and (out.width, out.height) == (64, 64)
    assert out.pair_id == pair_id(Path(rec.image_ref).read_bytes(), rec.caption)


def test_load_truncated_images_flag_is_refused(tmp_path, monkeypatch):
    manifest = make_csv_pool(tmp_path, n=1)
    monkeypatch.setattr(records.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        check_record(_records(manifest, "csv")[0])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_rejects_between_warning_and_error_thresholds(tmp_path, monkeypatch):
    (im, _, _) = real_images(1, size=40)[0]
    im.save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: PIL itself would only warn
    with pytest.raises(ImageLoadError) as err:
        load_image(str(tmp_path / "x.png"))
    assert err.value.reason == "decompression_bomb" and "1600" in str(err.value)
    with pytest.raises(ImageLoadError) as err:  # DICOM follows the same rule (128 x 128 per frame)
        load_image(get_testdata_file("CT_small.dcm"))
    assert err.value.reason == "decompression_bomb" and "16384" in str(err.value)


def test_count_records_matches_readers(tmp_path):
    from chips_core.pools.readers import count_records

    manifest, _ = make_bad_pool(tmp_path)
    sources = [
        (manifest, "csv"),
        (make_csv_pool(tmp_path, n=3, sep="\t"), "tsv"),
        (make_parquet_pool(tmp_path, n=4), "parquet"),
        (make_folder_pool(tmp_path, n=3), "folder"),
        (make_dicom_pool(tmp_path, names=("CT_small.dcm", "MR_small.dcm")), "dicom"),
    ]
    opts = ReaderOptions(image_col="image", caption_col="text")
    for source, fmt in sources:
        o = opts if fmt == "parquet" else ReaderOptions()
        assert count_records(str(source), fmt, o) == len(list(iter_records(str(source), fmt, o))) > 0, fmt
    assert count_records(str(make_wds_pool(tmp_path, n=2, shards=1)), "wds", ReaderOptions()) is None


def test_manifest_bom_header_and_binary_parquet_captions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbffilepath;title\na.png;caption one\n")
    recs = _records(tmp_path / "m.csv", "csv")
    assert [(Path(r.image_ref).name, r.caption) for r in recs] == [("a.png", "caption one")]
    table = pa.table(
        {"filepath": ["a.png", "b.png"], "title": pa.array([b"ok \xc3\xa9", b"bad \xe9"], pa.binary())}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    recs = _records(tmp_path / "m.parquet", "parquet")
    assert recs[0].caption == "ok \u00e9" and recs[0].reject is None
    assert recs[1].reject[0] == "undecodable_caption" and "row 2" in recs[1].reject[1]
