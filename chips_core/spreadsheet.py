"""Cells that are safe to open in a spreadsheet: text that would run as a formula gets a leading quote."""

from __future__ import annotations

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """Prefix a text cell a spreadsheet would treat as a formula with a single quote."""
    return "'" + cell if cell.startswith(FORMULA_PREFIXES) else cell
