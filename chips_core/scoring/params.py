"""The scoring parameters, each default written once: `PrepareConfig` (the scoring cache), `RankParams`
(a ranking), the named presets and the method list. Torch-free, so that the CLI can build its flags and
check them before anything heavy is imported (the flags' defaults are read from these dataclasses).

A preset fixes the parameter blocks of the scoring cache (a prepare option) and the rank options that
decide how a pair's gradient is compared with the target's (docs/SCORING.md says why each default):
- `default`: the two projections without the temperature, unit-norm gradients (LESS-style), λ = 0.1·tr C̃
  (the same at every k), the CLIPScore guard against image–caption disagreement, the image–caption
  agreement weighted three to one against the CHIPS score (`agreement` 0.75), and that combination weighted
  three to one against plain CLIPScore (`clipscore_weight` 0.25); both weights are the fields' defaults,
  chosen after CPT on three benchmarks (docs/SCORING.md);
- `paper`: the CHIPS paper's literal score (METHOD.md §1–6): every endpoint block, raw gradients,
  λ* with d(λ*) = k/4, no guard, no agreement or CLIPScore weight. Kept so that every comparison can show
  it beside the default.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

BLOCKS = ("visual", "text", "temperature")
DAMPINGS = ("trace", "dimension")
GUARDS = ("mad", "none")
SKETCHES = ("kronecker", "dense")
NEGATIVES = ("all", "self")
DTYPES = ("float32", "float64")

#: every scoring method of `rank`: CHIPS and the baselines on the same features and batches (METHOD.md §7)
METHODS = ("chips", "random", "clipscore", "dot", "tracin", "trak")
#: methods that need more than a scoring cache (tracin: caches of a warm-up run's checkpoints)
NEEDS_CHECKPOINTS = ("tracin",)

PRESETS: dict[str, dict[str, Any]] = {
    # guard None: 'mad' for chips, 'none' for the baselines, which stay literal
    "default": {"blocks": "visual,text", "damping": "trace", "normalize": True, "guard": None},
    "paper": {
        "blocks": "visual,text,temperature",
        "damping": "dimension",
        "normalize": False,
        "guard": "none",
        "agreement": 0.0,
        "clipscore_weight": 0.0,
    },
}
DEFAULT_BLOCKS = PRESETS["default"]["blocks"]
DAMPING_SCALE = 0.1  # λ = DAMPING_SCALE · tr C̃ under damping 'trace'

#: experiment / comparison method names: a scoring method, optionally with a preset ("chips-paper")
PRESET_METHODS = {"chips-paper": ("chips", "paper"), "chips": ("chips", "default")}
#: `chips experiment`'s default methods: every baseline that needs only the cache, then both presets
EXPERIMENT_METHODS = (*(m for m in METHODS if m != "chips" and m not in NEEDS_CHECKPOINTS), *PRESET_METHODS)


def default_k(k_max: int) -> int:
    """The default sketch prefix k of a cache with k_max stored rows: half of them, so that rows [k, 2k)
    remain for the stability check (the CLI's, the library's and the dashboard's default alike)."""
    return max(int(k_max) // 2, 1)


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


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that fixes a scoring cache; a different value needs a new cache folder."""

    k_max: int = 1024  # sketch rows stored
    sketch: str = "kronecker"  # JL sketch: kronecker | dense (reference)
    batch_size: int = 1024  # InfoNCE batch size
    seed: int = 0  # seed of batches, sketch and negatives
    negatives: str = "all"  # "all" in-batch negatives | "self" (ablation: negatives frozen)
    curvature_pairs: int = 100_000  # pool pairs used to estimate the curvature
    negatives_per_row: int = 8  # sampled negatives per row for the curvature
    chunk_batches: int = 32
    device: str = "cpu"
    dtype: str = "float32"  # math precision (never fp16)
    #: scored endpoint blocks, comma-separated in BLOCKS order (METHOD.md §9: the temperature is left out
    #: by default; "visual,text,temperature" is the paper's literal endpoint subspace)
    blocks: str = DEFAULT_BLOCKS

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", ",".join(parse_blocks(self.blocks)))  # frozen: canonical form

    def validate(self) -> None:
        if self.k_max < 2:
            raise ValueError(f"k_max must be at least 2, got {self.k_max}")
        _choice("negatives", self.negatives, NEGATIVES)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32 or float64 (never fp16), got {self.dtype!r}")
        if self.curvature_pairs < 2 or self.chunk_batches < 1 or self.negatives_per_row < 1:
            raise ValueError("curvature_pairs ≥ 2, chunk_batches ≥ 1 and negatives_per_row ≥ 1 are required")


@dataclass(frozen=True)
class RankParams:
    """Every option of one ranking (`ranking.rank`), validated on construction; stored with a score run
    (`dataclasses.asdict`), so `RankParams(**stored)` ranks the same cache the same way again.

    The defaults are the `default` preset's; `RankParams.preset('paper', ...)` starts from another one.
    """

    method: str = "chips"  # one of METHODS
    alpha: float = 0.7  # weight of the negative curvature, M = (1 − α)Φ_pos + αΦ_neg + λI
    lam: float | None = None  # damping λ; None: the `damping` rule's
    k: int | None = None  # sketch rows used, ≤ k_max; None: k_max/2 (so that stability is reported)
    beta: float = 0.5  # image/text balance of the relevance weight
    ratio: float = 0.3  # fraction marked selected
    seed: int = 0  # seed of the random baseline
    use_learnability: bool = True  # ablation switch of w_L
    use_relevance: bool = True  # ablation switch of w_R
    rank_normalized: bool = False  # use the rank of Â in (0, 1] instead of Â
    #: endpoint blocks the cache must score, comma-separated; None: whatever the cache scores
    blocks: str | None = None
    damping: str = PRESETS["default"]["damping"]  # λ rule: trace (0.1·tr C̃) | dimension (d(λ*) = k/4)
    normalize: bool = PRESETS["default"]["normalize"]  # unit-norm g̃ and ũ (LESS-style cosine)
    #: mad: hold CLIPScore outliers out of the selection; none; None: mad for chips, none for baselines
    guard: str | None = PRESETS["default"]["guard"]
    guard_mads: float = 2.5  # the guard holds out CLIPScore < median − guard_mads · 1.4826 · MAD
    #: γ, the weight of image–caption agreement in a chips ranking: score = P(Â·w_L·w_R)^(1−γ)·agreement^γ
    #: (P: the pool percentile; `weights.agreement`); 0: the CHIPS score alone (the paper preset's). A score
    #: run stored before this field existed ranked with 0: RankParams(**stored, agreement=0.0) repeats it
    agreement: float = 0.75
    #: δ, the weight of plain CLIPScore in a chips ranking: score = P(s)^(1−δ)·P(CLIPScore)^δ, s the score
    #: above; 0: s itself (the paper preset's). A score run stored before this field existed ranked with 0:
    #: RankParams(**stored, clipscore_weight=0.0) repeats it
    clipscore_weight: float = 0.25

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("alpha", "beta", "ratio", "guard_mads", "agreement", "clipscore_weight") + (
            ("lam",) if self.lam is not None else ()
        ):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))  # plain floats: the stored JSON round-trips
        for name in ("alpha", "beta", "agreement", "clipscore_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio!r}")
        if self.lam is not None and self.lam <= 0:
            raise ValueError(f"lam must be positive (or None for the damping rule's), got {self.lam!r}")
        if self.k is not None and (isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1):
            raise ValueError(f"k must be a positive integer (or None for k_max/2), got {self.k!r}")
        _choice("damping", self.damping, DAMPINGS)
        if self.guard is not None:
            _choice("guard", self.guard, GUARDS)
        if self.guard_mads <= 0:
            raise ValueError(f"guard_mads must be positive, got {self.guard_mads!r}")
        if self.blocks is not None:
            object.__setattr__(self, "blocks", ",".join(parse_blocks(self.blocks)))
        if self.k is not None:
            object.__setattr__(self, "k", int(self.k))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RankParams:
        """The parameters of a named preset (PRESETS), with `overrides` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> RankParams:
        """A copy with `changes` (validated again)."""
        return replace(self, **changes)

    @property
    def guard_rule(self) -> str:
        """The guard in force: `guard`, or for None 'mad' for chips and 'none' for the baselines."""
        if self.guard is not None:
            return self.guard
        return "mad" if self.method == "chips" else "none"


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (the one source of a flag's or widget's default)."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name!r}")
