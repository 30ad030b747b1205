"""The detail view's image reader (chips_core.curation.viewer) on real files: source size, display cap,
DICOM window/level against pydicom's own windowing and a hand computation."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from chips_core.curation import viewer
from chips_core.pools import dicom as pools_dicom
from tests.fixtures_build import real_images

pytestmark = pytest.mark.unit


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize(("center", "width"), [(40.0, 400.0), (-600.0, 1500.0), (1000.5, 2.0), (600, 1600)])
def test_window_matches_pydicom_linear_voi(center, width):
    values = np.linspace(-1200, 2500, 3001)
    ds = pydicom.Dataset()
    ds.WindowCenter, ds.WindowWidth, ds.BitsStored, ds.PixelRepresentation = center, width, 16, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    out = apply_voi_lut(values, ds)  # pydicom's window onto its own output range, probed at the extremes
    lo, hi = apply_voi_lut(np.array([-(2.0**40), 2.0**40]), ds)
    expected = np.rint((out - lo) / (hi - lo) * 255)
    got = viewer.window_to_uint8(values, center, width)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(float) - expected).max() <= 1  # the same window up to rounding
    # by hand: below the window black, above white, linear in between
    edge_lo, edge_hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    assert (got[values <= edge_lo] == 0).all() and (got[values > edge_hi] == 255).all()
    inside = (values > edge_lo) & (values <= edge_hi)
    lin = np.rint(((values[inside] - (center - 0.5)) / (width - 1) + 0.5) * 255)
    assert np.array_equal(got[inside], np.clip(lin, 0, 255))


def test_window_of_width_one_is_a_threshold_and_bad_windows_are_refused():
    assert viewer.window_to_uint8(np.array([9.0, 10.0, 10.6]), 10.5, 1).tolist() == [0, 0, 255]
    for c, w in ((0, 0.5), (np.nan, 10), (0, np.inf)):
        with pytest.raises(ValueError, match="width of at least 1"):
            viewer.window_to_uint8(np.zeros(3), c, w)


def test_full_range_window_reproduces_min_max_scaling():
    values = np.array([-1000.0, -200.0, 0.0, 333.0, 3071.0])
    w = viewer.full_range_window(values.min(), values.max())
    assert np.array_equal(
        viewer.window_to_uint8(values, w.center, w.width), pools_dicom.scale_to_uint8(values)
    )


def test_mr_file_window_is_reported_and_as_ingested_is_what_the_model_saw():
    path = get_testdata_file("MR_small.dcm")
    src = viewer.load_source(path)
    ds = pydicom.dcmread(path)
    assert src.source_size == (64, 64) and src.image.size == (64, 64) and src.scale == 1.0
    w = src.dicom
    assert w is not None and w.modality == "MR" and w.units == ""
    assert (w.applied.center, w.applied.width) == (600.0, 1600.0)
    assert "tags" in w.applied.origin
    # as ingested = the pixels ingest stores features of
    assert np.array_equal(np.asarray(src.image)[..., 0], pools_dicom.decode(Path(path).read_bytes()).pixels)
    # re-rendering with the file's window gives the same picture (up to rounding)
    again = np.asarray(viewer.render(w, w.applied))[..., 0].astype(float)
    assert np.abs(again - np.asarray(src.image)[..., 0]).max() <= 1
    # another window: pydicom's modality values, windowed by hand
    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)
    soft = np.asarray(viewer.render(w, viewer.Window(1000, 500, "test")))[..., 0]
    assert np.array_equal(soft, viewer.window_to_uint8(hu, 1000, 500))


def test_ct_without_window_uses_full_range_and_offers_ct_presets():
    path = get_testdata_file("CT_small.dcm")
    src = viewer.load_source(path)
    w = src.dicom
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)
    assert w.units == "HU" and w.value_range == (hu.min(), hu.max())
    assert w.applied == viewer.full_range_window(hu.min(), hu.max())
    assert "no window" in w.applied_note
    names = list(viewer.presets(w))
    assert names[:2] == [viewer.AS_INGESTED, viewer.FULL_RANGE] and "Lung" in names and "Bone" in names
    lung = viewer.presets(w)["Lung"]
    assert np.array_equal(np.asarray(viewer.render(w, lung))[..., 1], viewer.window_to_uint8(hu, -600, 1500))
    assert "Lung" not in viewer.presets(viewer.load_source(get_testdata_file("MR_small.dcm")).dicom)


def test_monochrome1_is_inverted_and_colour_dicom_has_no_window(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    (tmp_path / "m1.dcm").write_bytes(_bytes(ds))
    src = viewer.load_source(str(tmp_path / "m1.dcm"))
    assert src.dicom.invert
    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)
    got = np.asarray(viewer.render(src.dicom, viewer.Window(600, 1600, "t")))[..., 0]
    assert np.array_equal(got, 255 - viewer.window_to_uint8(hu, 600, 1600))
    rgb = viewer.load_source(get_testdata_file("SC_rgb.dcm"))
    assert rgb.dicom is None and rgb.source_size == (100, 100)


def test_large_images_are_capped_for_display_and_dicom_values_follow(tmp_path):
    big = Image.new("RGB", (3000, 1000), (10, 200, 30))
    big.save(tmp_path / "wide.png")
    src = viewer.load_source(str(tmp_path / "wide.png"), max_side=2048)
    assert src.source_size == (3000, 1000) and src.image.size == (2048, 683)
    assert src.scale == pytest.approx(2048 / 3000) and src.dicom is None

    ct = viewer.load_source(get_testdata_file("CT_small.dcm"), max_side=32)  # 128 px: shrunk 4×
    assert ct.source_size == (128, 128) and ct.image.size == (32, 32) and ct.dicom.values.shape == (32, 32)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    blocks = hu.astype(float).reshape(32, 4, 32, 4).mean(axis=(1, 3))  # area average by hand
    assert np.allclose(ct.dicom.values, blocks, atol=1e-2)


def test_webdataset_members_and_unreadable_files(tmp_path):
    im, _, _ = real_images(1, size=80)[0]
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        info = tarfile.TarInfo("0001.png")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))
    src = viewer.load_source(f"{shard}::0001.png")
    assert src.source_size == (80, 80) and np.array_equal(np.asarray(src.image), np.asarray(im))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(viewer.ViewerError, match="bad.png"):
        viewer.load_source(str(tmp_path / "bad.png"))
    with pytest.raises(viewer.ViewerError, match="missing.png"):
        viewer.load_source(str(tmp_path / "missing.png"))
