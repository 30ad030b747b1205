"""data/build_demo.py's caption text: DICOM description tags are cleaned of leftovers, and the indefinite
article agrees with the sound of the next word. (The shipped manifests are checked in
tests/integration/test_demo.py.)"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "build_demo.py"


@pytest.fixture(scope="module")
def bd():
    spec = importlib.util.spec_from_file_location("build_demo_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("marked lesion<MPR Collection>", "marked lesion"),  # pydicom's examples_overlay.dcm
        ("<MPR Collection> marked lesion", "marked lesion"),
        ("abdomen^liver", "abdomen liver"),
        ("  Routine   Brain ", "Routine Brain"),
        ("5/5mm Plain", "5/5mm Plain"),
        ("CT, HEAD/BRAIN WO CONTRAST", "CT, HEAD/BRAIN WO CONTRAST"),
        ("Brain , MRA", "Brain, MRA"),
        ("lesion >", "lesion"),
        ("- Scout -", "Scout"),
        ("<MPR Collection>", ""),
        (" ^ , ", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_clean_description(bd, raw, clean):
    assert bd.clean_description(raw) == clean


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("ultrasound image", "an ultrasound image"),
        ("MR scan", "an MR scan"),
        ("MRI", "an MRI"),
        ("X-ray", "an X-ray"),
        ("sonogram", "a sonogram"),
        ("CT scan", "a CT scan"),
        ("computed tomography", "a computed tomography"),
        ("magnetic resonance image", "a magnetic resonance image"),
        ("nuclear medicine scan", "a nuclear medicine scan"),
        ("gamma camera image", "a gamma camera image"),
        ("image", "an image"),
        ("unit", "a unit"),
        ("hour", "an hour"),
    ],
)
def test_with_article(bd, phrase, expected):
    assert bd.with_article(phrase) == expected


def _source(bd, modality, study="", series="", body=""):
    fields = {"modality": modality, "body": body, "study": study, "series": series}
    return bd.Source("k", np.zeros((8, 8), np.float32), bd.MODALITY[modality][0], "pydicom", "f", 0, fields)


def test_caption_for_every_template_reads_cleanly(bd):
    """Every caption the DICOM templates make for every modality: no bracketed leftover, the right article."""
    for modality in bd.MODALITY:
        src = _source(bd, modality, study="abdomen liver", series="marked lesion", body="abdomen")
        captions = {bd.caption_for(src, np.random.default_rng(i)) for i in range(400)}
        assert len(captions) > 5
        for c in captions:
            assert "<" not in c and ">" not in c, c
            for bad in ("a ultrasound", "a MR ", "a MRI", "a X-ray", "an CT", "an sonogram"):
                assert not c.startswith(bad), c
    us = {bd.caption_for(_source(bd, "US"), np.random.default_rng(i)) for i in range(200)}
    assert "an ultrasound image" in us and "a sonogram" in us


def test_dicom_series_tag_is_cleaned(bd):
    """The tag reader itself cleans: pydicom's examples_overlay.dcm has SeriesDescription
    'marked lesion<MPR Collection>'; an all-leftover tag reads as missing."""
    ds = {"SeriesDescription": "marked lesion<MPR Collection>", "StudyDescription": "<MPR Collection>"}
    assert bd._tag(ds, "SeriesDescription") == "marked lesion"
    assert bd._tag(ds, "StudyDescription") == ""
    assert bd._tag(ds, "BodyPartExamined") == ""


def test_model_config_found(bd):
    """The training step reads the registered tiny-CLIP config (it moved under chips_core/features/)."""
    assert bd.MODEL_CONFIG_FILE.is_file()
    assert bd.open_clip_config()["model_name"] == bd.MODEL_NAME
