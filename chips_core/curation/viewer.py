"""A pair's image for the detail view: at its source resolution (shrunk only past `MAX_SIDE` px) and, for
grey DICOM images, the window/level (centre/width) that ingest applied plus re-windowing for viewing.

Images are read with the readers ingest and featurize use (`chips_core.pools.records`: plain files,
'shard.tar::member', DICOM). The "as ingested" picture of a DICOM file is `pools.dicom.decode`'s, the very
pixels the model saw; another window maps the modality values (Hounsfield units for CT) with DICOM's linear
VOI function (PS3.3 C.11.2.1.2.1) onto 0..255.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from chips_core.errors import ChipsError
from chips_core.pools import dicom, records

MAX_SIDE = 2048  # the longest side shown; larger images are shrunk for display (the file is untouched)
# Common CT windows (centre, width) in Hounsfield units.
CT_PRESETS = {
    "Soft tissue": (40.0, 400.0),
    "Lung": (-600.0, 1500.0),
    "Bone": (400.0, 1800.0),
    "Brain": (40.0, 80.0),
}
AS_INGESTED = "As ingested (what the model saw)"
FULL_RANGE = "Full range of the image"


class ViewerError(ChipsError):
    """An image that cannot be shown; the message names it."""


@dataclass(frozen=True)
class Window:
    """A DICOM window: centre (level) and width, in the image's modality units; `origin` says where it
    comes from, in plain words."""

    center: float
    width: float
    origin: str


@dataclass(frozen=True)
class DicomWindowing:
    """What is needed to re-window a grey DICOM image for viewing."""

    values: np.ndarray  # modality values (after rescale slope/intercept) at display size, float32
    applied: Window | None  # the linear window ingest applied; None when the file's VOI LUT table was used
    applied_note: str  # plain words on what ingest applied
    value_range: tuple[float, float]  # min and max modality value of the frame
    modality: str
    units: str  # "HU" for CT, else ""
    invert: bool  # MONOCHROME1: high values are dark


@dataclass(frozen=True)
class SourceImage:
    """An image at source resolution (or shrunk to `MAX_SIDE`), its size in the file, and DICOM windowing."""

    image: Image.Image  # RGB, as ingested
    source_size: tuple[int, int]  # (width, height) in the file
    dicom: DicomWindowing | None

    @property
    def scale(self) -> float:
        """Displayed pixels per source pixel (1.0 unless the image was shrunk for display)."""
        return self.image.size[0] / self.source_size[0]


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear window onto 0..255: values at or below c − ½ − (w − 1)/2 are 0, above c − ½ + (w − 1)/2
    are 255, linear in between; width ≥ 1."""
    if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
        raise ValueError(f"a window needs a finite centre and a width of at least 1, got {center}, {width}")
    x = np.asarray(values, dtype=np.float64)
    if width == 1:
        return np.where(x > center - 0.5, 255, 0).astype(np.uint8)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def full_range_window(lo: float, hi: float) -> Window:
    """The window that maps [lo, hi] linearly onto 0..255 (ingest's choice when a file has no window)."""
    return Window((lo + hi) / 2 + 0.5, max(hi - lo + 1, 1.0), "the full range of the image")


def presets(w: DicomWindowing) -> dict[str, Window | None]:
    """Windows to choose from: as ingested (None: ingest's own pixels), the full range, and for CT the
    common tissue windows."""
    out: dict[str, Window | None] = {AS_INGESTED: None, FULL_RANGE: full_range_window(*w.value_range)}
    if w.modality == "CT":
        out.update(
            {name: Window(c, wd, f"the {name.lower()} preset") for name, (c, wd) in CT_PRESETS.items()}
        )
    return out


def render(w: DicomWindowing, window: Window) -> Image.Image:
    """The image at display size under another window (MONOCHROME1 inverted as at ingest)."""
    out = window_to_uint8(w.values, window.center, window.width)
    return dicom.to_pil_rgb(255 - out if w.invert else out)


def _first(value: Any) -> float:
    """The first of a multi-valued tag (DICOM allows several windows; pydicom and ingest use the first)."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _applied(ds: Any, lo: float, hi: float) -> tuple[Window | None, str]:
    """The window ingest applied to this pydicom data set (as `pools.dicom.decode` does) and a note."""
    if "VOILUTSequence" in ds:
        return None, "the file's own VOI lookup table (not a centre/width window)"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, wd = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function != "LINEAR":
            return None, f"the file's {function.lower()} window, centre {c:g}, width {wd:g}"
        return Window(c, wd, "the file's tags (Window Center / Window Width)"), "the file's window"
    return full_range_window(lo, hi), "the full range of the image (the file names no window)"


def _display_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    f = min(1.0, max_side / max(w, h))
    return max(1, round(w * f)), max(1, round(h * f))


def _dicom_source(data: bytes, max_side: int) -> SourceImage:
    from pydicom.pixels import apply_modality_lut

    pixels = dicom.decode(data).pixels
    image = dicom.to_pil_rgb(pixels)
    size = image.size
    image = (
        image.resize(_display_size(size, max_side), Image.Resampling.LANCZOS)
        if max(size) > max_side
        else image
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, arr = dicom.read_frame(data)
        if not dicom.is_grey(ds):
            return SourceImage(image, size, None)
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    if values.shape[::-1] != image.size:  # area average down to the display size
        values = np.asarray(Image.fromarray(values, mode="F").resize(image.size, Image.Resampling.BOX))
    applied, note = _applied(ds, lo, hi)
    modality = str(ds.get("Modality", "") or "").strip()
    units = "HU" if modality == "CT" and "RescaleIntercept" in ds else ""
    invert = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    return SourceImage(image, size, DicomWindowing(values, applied, note, (lo, hi), modality, units, invert))


def load_source(ref: str, max_side: int = MAX_SIDE) -> SourceImage:
    """Read one image reference at source resolution (longest side shrunk to `max_side` when larger);
    raises ViewerError naming it."""
    try:
        data = records.read_image_bytes(ref)
        if records.is_dicom_ref(ref, data):
            return _dicom_source(data, max_side)
        image = records.to_rgb(records.decode_pil(data, ref))
    except (records.ImageLoadError, dicom.DicomError, OSError) as exc:
        raise ViewerError(f"cannot read image {ref!r}: {exc}") from exc
    size = image.size
    if max(size) > max_side:
        image = image.resize(_display_size(size, max_side), Image.Resampling.LANCZOS)
    return SourceImage(image, size, None)
