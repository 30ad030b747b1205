"""A pair's image at its source resolution in a zoomable figure; for grey DICOM images the window/level
ingest applied and a choice of another one for viewing (chips_core.curation.viewer does the reading and
the windowing)."""

from __future__ import annotations

import base64
import io

import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from chips_core.curation import viewer


@st.cache_resource(max_entries=16, show_spinner=False)
def _source(filepath: str) -> viewer.SourceImage:
    return viewer.load_source(filepath)


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(src: viewer.SourceImage, image: Image.Image, height: int) -> go.Figure:
    """The image in source-pixel coordinates (a shrunk image is stretched back), zoomable and pannable."""
    w, h = src.source_size
    step = 1 / src.scale
    fig = go.Figure(go.Image(source=_data_uri(image), x0=step / 2 - 0.5, y0=step / 2 - 0.5, dx=step, dy=step))
    fig.update_xaxes(range=[-0.5, w - 0.5], showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(
        range=[h - 0.5, -0.5], showgrid=False, zeroline=False, scaleanchor="x", constrain="domain"
    )
    fig.update_layout(height=height, margin={"l": 0, "r": 0, "t": 0, "b": 0}, dragmode="pan")
    return fig


def _window_choice(src: viewer.SourceImage, key: str) -> tuple[Image.Image, str]:
    """The window/level controls of a grey DICOM image; returns the image to show and a line saying which
    window it is shown with."""
    w = src.dicom
    assert w is not None
    unit = f" {w.units}" if w.units else ""
    applied = (
        f"centre {w.applied.center:g}{unit}, width {w.applied.width:g}{unit}, from {w.applied.origin}"
        if w.applied is not None
        else w.applied_note
    )
    st.markdown(f"**Window at ingest** (what the model saw): {applied}")
    choices = viewer.presets(w)
    name = st.selectbox(
        "Window for viewing",
        [*choices, "Custom"],
        key=f"{key}-window",
        help="Brightness and contrast of a DICOM image: which range of values is spread from black to white. "
        "Only this view changes; the features and the ranking keep the window applied at ingest.",
    )
    if name == viewer.AS_INGESTED:
        return src.image, "Shown as ingested."
    if name == "Custom":
        start = w.applied or viewer.full_range_window(*w.value_range)
        left, right = st.columns(2)
        center = left.number_input(f"Centre (level){unit}", value=float(start.center), key=f"{key}-center")
        width = right.number_input(
            f"Width{unit}", min_value=1.0, value=float(max(start.width, 1.0)), key=f"{key}-width"
        )
        window = viewer.Window(float(center), float(width), "your choice")
    else:
        window = choices[name]
    lo, hi = w.value_range
    note = f"Shown with centre {window.center:g}{unit}, width {window.width:g}{unit} "
    note += f"(values in this image: {lo:g} to {hi:g}{unit})."
    return viewer.render(w, window), note


def source_image(filepath: str, key: str, height: int = 520) -> None:
    """The image at source resolution in a zoomable figure, its size, and DICOM window/level controls."""
    try:
        src = _source(filepath)
    except viewer.ViewerError as exc:
        st.warning(str(exc))
        return
    image, shown = _window_choice(src, key) if src.dicom is not None else (src.image, "")
    st.plotly_chart(
        _figure(src, image, height),
        key=f"{key}-figure",
        config={"scrollZoom": True, "displaylogo": False},
    )
    w, h = src.source_size
    if src.scale < 1:
        size = (
            f"Source {w:,} × {h:,} px, shown shrunk to {src.image.size[0]:,} × {src.image.size[1]:,} px "
            f"(the view is capped at {viewer.MAX_SIDE:,} px on the long side)."
        )
    else:
        size = f"Source {w:,} × {h:,} px, shown at full resolution."
    st.caption(f"{size} {shown} Scroll to zoom, drag to move, double-click to fit.")
