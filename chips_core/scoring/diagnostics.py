"""Warnings about a ranking that the CLI and the dashboard both show (no heavy imports)."""

from __future__ import annotations

import math

STABILITY_WARN_BELOW = 0.5


def stability_warning(stability: float | None) -> str | None:
    """A one-line warning when the ranking stability (Spearman of sketch rows [0, k) vs [k, 2k)) is low."""
    if stability is None or not math.isfinite(float(stability)) or stability >= STABILITY_WARN_BELOW:
        return None
    return (
        f"ranking stability {float(stability):.3f} is below {STABILITY_WARN_BELOW}: two independent "
        "halves of the fast approximation (the sketch) rank the pool differently, so this ranking is mostly "
        "noise (too few pool or eval pairs, or k too small); do not select from it without checking"
    )
