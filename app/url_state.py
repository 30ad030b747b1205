"""The dashboard's view in the URL: a reload or a shared link shows the same method, sliders, pair, ...

On a session's first run `seed()` copies the query parameters named in `FIELDS` into st.session_state (a
value that does not parse, or is out of its widget's range, is ignored); after every run `write()` puts the
current values back into st.query_params, leaving out a value equal to its field's `default` (an empty search
or filter, the first gallery page). The page itself is the URL's path (st.navigation's url_path).
Values round-trip exactly: floats as `repr`, booleans as true/false, lists of names comma-separated, lists of
free text (labels) as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import streamlit as st

from app import context
from chips_core import demo
from chips_core.curation import search
from chips_core.scoring import params as sp

SEEDED = "url_state_seeded"  # session key: the URL has been read in this session


@dataclass(frozen=True)
class Field:
    """How one session_state key is read from and written to the URL (parse raises ValueError if invalid);
    a value equal to `default` is left out of the URL (the widget shows it without one)."""

    parse: Callable[[str], Any]
    format: Callable[[Any], str] = str
    default: Any = None


def _one_of(options: Any, cast: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """A parser that accepts only the values the widget offers."""

    def parse(text: str) -> Any:
        value = cast(text)
        if value not in options:
            raise ValueError(text)
        return value

    return parse


def _in_range(cast: Callable[[str], Any], lo: float, hi: float) -> Callable[[str], Any]:
    """A parser for a finite number within the widget's range [lo, hi]."""

    def parse(text: str) -> Any:
        value = cast(text)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(text)
        return value

    return parse


def _bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(text)
    return text == "true"


def _blocks(text: str) -> list[str]:
    names = text.split(",")
    if not names or len(set(names)) != len(names) or not set(names) <= set(sp.BLOCKS):
        raise ValueError(text)
    return names


def _subset(options: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A parser for distinct comma-separated names, each one of `options` (a multiselect's choice)."""

    def parse(text: str) -> list[str]:
        names = text.split(",")
        if len(set(names)) != len(names) or not set(names) <= set(options):
            raise ValueError(text)
        return names

    return parse


def _texts(text: str) -> list[str]:
    """Distinct strings as a JSON list (labels are free text: they may hold commas)."""
    value = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(text)
    if len(set(value)) != len(value):
        raise ValueError(text)
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _name(text: str) -> str:
    if not text.strip():
        raise ValueError(text)
    return text


_BOOL = Field(_bool, lambda v: "true" if v else "false")
FIELDS: dict[str, Field] = {
    "pool_name": Field(_name),  # the sidebar's pool / eval set (main.py drops names the workspace lacks)
    "eval_name": Field(_name),
    "method": Field(_one_of(context.METHODS)),
    "preset": Field(_one_of(sp.PRESETS)),
    "guard_on": _BOOL,
    "guard_mads": Field(_in_range(float, *context.RANGES["guard_mads"]), repr),
    "agreement": Field(_in_range(float, *context.RANGES["agreement"]), repr),
    "clipscore_weight": Field(_in_range(float, *context.RANGES["clipscore_weight"]), repr),
    "blocks": Field(_blocks, ",".join),
    "normalize": _BOOL,
    "damping": Field(_one_of(sp.DAMPINGS)),
    "alpha": Field(_in_range(float, *context.RANGES["alpha"]), repr),
    "lam_factor": Field(_one_of(context.LAM_FACTORS, float), repr),
    "k": Field(_in_range(int, 1, 2**31)),  # context.scoring_context checks it against the cache's k_max
    "beta": Field(_in_range(float, *context.RANGES["beta"]), repr),
    "ratio": Field(_in_range(float, *context.RANGES["ratio"]), repr),
    "use_learnability": _BOOL,
    "use_relevance": _BOOL,
    "rank_normalized": _BOOL,
    "detail_pair": Field(_in_range(int, -(2**63), 2**63 - 1)),  # the pair the detail view shows (Browse)
    "review_pos": Field(_in_range(int, 1, 2**31)),  # the review queue's position (Browse; 1 = first pair)
    "review_skip": _BOOL,
    "map_space": Field(_one_of(("image", "text"))),
    "map_colour": Field(_name),  # checked against the Map page's colour choices there
    # the Browse page's search, filters and gallery pages (empty / first page: not in the URL)
    "browse_text": Field(str, default=""),
    "browse_decision": Field(_subset(search.DECISION_STATES), ",".join, default=[]),
    "browse_label": Field(_texts, json.dumps, default=[]),  # the multiselect drops labels the pool lacks
    "browse_planted": Field(_subset(demo.PLANTED), ",".join, default=[]),
    **{f"browse_{end}_{comp}": Field(_finite, repr) for end in ("min", "max") for comp in search.COMPONENTS},
    "browse_per_page": Field(_one_of(context.PER_PAGE, int), default=context.PER_PAGE_DEFAULT),
    "browse_top_start": Field(_in_range(int, 1, 2**31), default=1),  # position of the gallery's first pair
    "browse_bottom_start": Field(_in_range(int, 1, 2**31), default=1),
}


def parse(key: str, text: str) -> Any:
    """The session value of `key` from its URL text; ValueError when it is not a valid value."""
    return FIELDS[key].parse(text)


def to_text(key: str, value: Any) -> str:
    """The URL text of a session value (parse(key, to_text(key, v)) == v)."""
    return FIELDS[key].format(value)


def seed() -> None:
    """Once per session, before any widget is drawn: URL values into st.session_state (invalid ones are
    ignored)."""
    state = st.session_state
    if state.get(SEEDED):
        return
    state[SEEDED] = True
    for key, field in FIELDS.items():
        text = st.query_params.get(key)
        if text is None:
            continue
        try:
            state[key] = field.parse(text)
        except (ValueError, TypeError, OverflowError):
            continue


def write() -> None:
    """The current values into st.query_params (only when something changed; other parameters are kept);
    a field at its default is removed."""
    state = st.session_state
    wanted = {
        key: to_text(key, state[key])
        for key, field in FIELDS.items()
        if state.get(key) is not None and state[key] != field.default
    }
    current = {key: st.query_params.get(key) for key in FIELDS}
    changed = {key: text for key, text in wanted.items() if current[key] != text}
    if changed:
        st.query_params.update(changed)
    for key in FIELDS:
        if key not in wanted and current[key] is not None:
            del st.query_params[key]
