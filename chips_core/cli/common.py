"""What every `chips` command shares: the command registry, cheap argparse types, the workspace argument
and the output helpers. Errors for the user are `ChipsError`s (chips_core.errors); `main` prints them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chips_core.errors import ChipsError
from chips_core.scoring import params as sp
from chips_core.workspace.store import Workspace


@dataclass(frozen=True)
class Command:
    """One subcommand: its parser setup and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add a subcommand (later registrations of the same name replace earlier ones)."""
    COMMANDS[name] = Command(name, help, add_arguments, run)


class CliError(ChipsError):
    """A command-line problem with a message meant for the user."""


# --- cheap argparse types: bad parameters are refused before anything heavy is imported ----------------


def ranged(
    cast: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], Any]:
    """An argparse type: `cast(text)` that must be finite and lie in the interval (lo, hi) given."""
    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    if lo is not None and hi is not None:
        want = f"a number in {left}, {right}"
    elif lo is not None:
        want = ("a number > " if lo_open else "a number ≥ ") + f"{lo:g}"
    else:
        want = ("a number < " if hi_open else "a number ≤ ") + f"{hi:g}"
    if cast is int:
        want = want.replace("a number", "an integer")

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is not {want}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its messages
    return parse


def positive(cast: type) -> Callable[[str], Any]:
    return ranged(cast, 0, lo_open=True)


UNIT = ranged(float, 0, 1)  # α, β
FRACTION = ranged(float, 0, 1, lo_open=True)  # a selection ratio


def field_flag(
    group: Any, cls: type, name: str, help: str, flag: str | None = None, show: bool = True, **kwargs: Any
) -> None:
    """Add the flag of field `name` of dataclass `cls` (`--name-with-dashes` unless `flag`), its default
    read from the dataclass (the one place it is written) and shown in the help unless show=False."""
    from chips_core.scoring.params import default_of

    default = default_of(cls, name)
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    kwargs.setdefault("dest", name)
    group.add_argument(
        flag or "--" + name.replace("_", "-"),
        default=default,
        help=f"{help} (default {shown})" if show else help,
        **kwargs,
    )


# --- helpers shared by commands -------------------------------------------------------------------------


def open_workspace(path: str, must_exist: bool = True) -> Workspace:
    """The workspace at `path`; unless must_exist=False, a WorkspaceError names it when not initialised."""
    ws = Workspace(path)
    if must_exist:
        ws.check()
    return ws


def say(text: str) -> None:
    """Print a result line on stdout (flushed: job logs show it at once)."""
    print(text, flush=True)


def note(text: str) -> None:
    """Print a note on stderr (a parameter was adjusted, which run was chosen...)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """Print a warning on stderr (the command succeeded but its result needs care)."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def sel_ref(text: str) -> str | int:
    """A selection reference as every command takes it: an id, a name (latest version) or name@version."""
    return int(text) if text.lstrip("-").isdigit() else text


def selection_id(ws: Workspace, ref: str | int) -> int:
    """The id of the selection `ref` names (id, name or name@version); a SelectionError names a bad one."""
    from chips_core.curation import selection as sel

    return sel.get_selection(ws, sel_ref(str(ref))).selection_id


def add_weight_flags(p: Any) -> None:
    """--agreement and --clipscore-weight: RankParams.agreement and .clipscore_weight, default None (the
    preset's: `score` and `experiment` share them)."""
    p.add_argument(
        "--agreement",
        type=UNIT,
        default=None,
        help="γ in [0, 1], the weight of image–caption agreement: score = P(CHIPS score)^(1−γ)·agreement^γ, "
        "agreement = the pool percentile of CLIPScore minus its least-squares fit on the relevance cosines "
        "(docs/SCORING.md); 0 ranks by the CHIPS score alone (default: the preset's, "
        f"{sp.default_of(sp.RankParams, 'agreement'):g}; the paper preset's and chips-paper's 0; chips only)",
    )
    p.add_argument(
        "--clipscore-weight",
        type=UNIT,
        default=None,
        help="δ in [0, 1], the weight of plain CLIPScore: that score s becomes P(s)^(1−δ)·P(CLIPScore)^δ "
        "(docs/SCORING.md); 0 keeps s (default: the preset's, "
        f"{sp.default_of(sp.RankParams, 'clipscore_weight'):g}; the paper preset's and chips-paper's 0; "
        "chips only)",
    )
