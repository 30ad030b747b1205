"""Named scoring presets and the scoring defaults, torch-free so that the CLI can check flags early.

A preset fixes the parameter blocks of the scoring cache (a prepare option) and the rank options that
decide how a pair's gradient is compared with the target's (docs/SCORING.md says why each default):
- `default`: the two projections without the temperature, unit-norm gradients (LESS-style), λ = 0.1·tr C̃
  (the same at every k), and the CLIPScore guard against image–caption disagreement;
- `paper`: the CHIPS paper's literal score (METHOD.md §1–6): every endpoint block, raw gradients,
  λ* with d(λ*) = k/4, no guard. Kept so that every comparison can show it beside the default.
"""

from __future__ import annotations

BLOCKS = ("visual", "text", "temperature")
DAMPINGS = ("trace", "dimension")
GUARDS = ("mad", "none")

PRESETS: dict[str, dict] = {
    "default": {"blocks": "visual,text", "damping": "trace", "normalize": True, "guard": "mad"},
    "paper": {
        "blocks": "visual,text,temperature",
        "damping": "dimension",
        "normalize": False,
        "guard": "none",
    },
}
DEFAULT_BLOCKS = PRESETS["default"]["blocks"]
DAMPING_SCALE = 0.1  # λ = DAMPING_SCALE · tr C̃ under damping 'trace'
GUARD_MADS = 2.5  # the guard holds out CLIPScore < median − GUARD_MADS · 1.4826 · MAD

#: experiment / comparison method names: a scoring method, optionally with a preset ("chips-paper")
PRESET_METHODS = {"chips": ("chips", "default"), "chips-paper": ("chips", "paper")}


def parse_blocks(blocks: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Canonical tuple (in BLOCKS order) of a block list given as 'visual,text' or a sequence."""
    names = [b.strip() for b in (blocks.split(",") if isinstance(blocks, str) else blocks) if b.strip()]
    unknown = sorted(set(names) - set(BLOCKS))
    if unknown or not names:
        raise ValueError(
            f"blocks must be a non-empty subset of {', '.join(BLOCKS)}, got {','.join(names) or 'nothing'}"
        )
    return tuple(b for b in BLOCKS if b in names)


def resolve_method(name: str) -> tuple[str, str | None]:
    """(scoring method, preset or None) of a comparison method name such as 'chips-paper' or 'dot'."""
    return PRESET_METHODS.get(name, (name, None))


def rank_options(preset: str) -> dict:
    """The rank() keyword arguments of a preset (its blocks belong to the cache, not to rank)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[preset].items() if k != "blocks"}
