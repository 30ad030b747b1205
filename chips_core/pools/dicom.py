"""DICOM images for CLIP: display pixels (modality LUT, VOI window, MONOCHROME1 inverted, 8-bit) and
captions from a template over DICOM tags, e.g. "{Modality} {BodyPartExamined} {StudyDescription}".

Multi-frame files contribute their middle frame (the only one decoded). Nothing here touches the network
or the workspace.
"""

from __future__ import annotations

import io
import string
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from chips_core.errors import ChipsError

DEFAULT_TEMPLATE = "{Modality} {BodyPartExamined} {StudyDescription}"


class DicomError(ChipsError, ValueError):
    """A DICOM file that cannot be turned into an image; `reason` is a reject reason code."""

    def __init__(self, message: str, reason: str = "bad_dicom") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DicomImage:
    """Display-ready pixels (uint8, (H, W) or (H, W, 3)) and the templated caption (None without template)."""

    pixels: np.ndarray
    caption: str | None


def check_template(template: str) -> None:
    """Raise ValueError naming the template when it is not a valid format string of tag keywords."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"caption template {template!r} is invalid: {exc}") from None
    bad = [f for f in fields if not f.isidentifier()]
    if bad:
        raise ValueError(f"caption template {template!r}: fields must be DICOM keywords, got {bad}")


class _Tags(dict):
    """format_map mapping: a DICOM keyword -> its value as text ('' when absent)."""

    def __init__(self, ds) -> None:  # noqa: ANN001 - pydicom Dataset
        super().__init__()
        self.ds = ds

    def __missing__(self, key: str) -> str:
        value = self.ds.get(key, None)
        if value is None:
            return ""
        if hasattr(value, "value") and not isinstance(value, str | bytes):  # a DataElement
            value = value.value
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            return " ".join(str(v) for v in value)
        if isinstance(value, bytes):
            return ""
        return str(value)


def caption_from_tags(ds, template: str) -> str:  # noqa: ANN001 - pydicom Dataset
    """Fill a template with tag values; runs of whitespace collapse to one space."""
    return " ".join(template.format_map(_Tags(ds)).split())


def scale_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map [lo, hi] (default: the array's min and max) to 0..255."""
    arr = np.asarray(arr, dtype=np.float64)
    lo = float(np.min(arr)) if lo is None else lo
    hi = float(np.max(arr)) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def to_pil_rgb(pixels: np.ndarray) -> Image.Image:
    """A uint8 (H, W) or (H, W, 3) array as an RGB PIL image."""
    im = Image.fromarray(np.ascontiguousarray(pixels))
    return im if im.mode == "RGB" else im.convert("RGB")


def _bits_max(ds, arr: np.ndarray) -> float:  # noqa: ANN001
    bits = int(ds.get("BitsStored", 0) or 0) or arr.dtype.itemsize * 8
    return float(2**bits - 1)


def _grey_display(arr: np.ndarray, ds) -> np.ndarray:  # noqa: ANN001
    """Modality LUT, then VOI LUT / window, then 8-bit; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    lo = hi = None
    if has_voi:
        values = apply_voi_lut(values, ds)
        # The window's own output range: probe it with values far below and above any pixel.
        probe = apply_voi_lut(np.array([-(2.0**40), 2.0**40]), ds).astype(np.float64)
        if np.all(np.isfinite(probe)) and probe.max() > probe.min():
            lo, hi = float(probe.min()), float(probe.max())
    out = scale_to_uint8(values, lo, hi)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def read_frame(data: bytes) -> tuple[Any, np.ndarray]:
    """The data set and the stored pixels of the frame CLIP sees (the middle one of a multi-frame file);
    raises DicomError. The caller holds `warnings.catch_warnings` if pydicom's warnings should be quiet."""
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise DicomError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("DICOM file has no pixel data")
    try:
        n_pixels = int(ds.Rows) * int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomError(f"DICOM file lacks Rows/Columns/NumberOfFrames ({exc})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and n_pixels > limit:  # the same per-image rule as PIL images
        raise DicomError(f"{n_pixels} pixels per frame exceed PIL's limit of {limit}", "decompression_bomb")
    try:
        # Only the middle frame is decoded: a long multi-frame series never sits in memory whole.
        arr = pixel_array(ds, index=frames // 2) if frames > 1 else ds.pixel_array
    except Exception as exc:  # missing codec, inconsistent header, short pixel data
        raise DicomError(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    return ds, arr


def is_grey(ds: Any) -> bool:
    """Whether the data set's pixels are one grey value each (not palette colour, not RGB/YBR)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    return photometric != "PALETTE COLOR" and int(ds.get("SamplesPerPixel", 1) or 1) == 1


def decode(data: bytes, template: str | None = None) -> DicomImage:
    """Decode DICOM bytes into display pixels and (with `template`) a caption; raises DicomError."""
    from pydicom.pixels import apply_color_lut

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, arr = read_frame(data)
        try:
            photometric = str(ds.get("PhotometricInterpretation", "")).strip()
            if photometric == "PALETTE COLOR":
                rgb = apply_color_lut(arr, ds)
                pixels = (
                    rgb
                    if rgb.dtype == np.uint8
                    else scale_to_uint8(rgb, 0.0, float(2 ** (8 * rgb.itemsize) - 1))
                )
            elif not is_grey(ds):  # pydicom converts YBR to RGB
                pixels = arr if arr.dtype == np.uint8 else scale_to_uint8(arr, 0.0, _bits_max(ds, arr))
            else:
                pixels = _grey_display(arr, ds)
        except Exception as exc:  # missing LUT data, inconsistent header
            raise DicomError(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
        if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 1:
            raise DicomError(f"unexpected pixel array shape {pixels.shape}")
        caption = caption_from_tags(ds, template) if template is not None else None
    return DicomImage(np.ascontiguousarray(pixels), caption)
