"""Loading open_clip models for scoring: name + pretrained tag, local checkpoint file, or `hf-hub:` id.

`load_model` returns a `LoadedModel`: the model in eval mode, its eval preprocess, its tokenizer, an
`EndpointAdapter` (chips_core.features.adapters) and a stable `ModelIdentity` (name, pretrained tag,
checkpoint path
and sha256) that the workspace's `models` table records. Checkpoints are read with `weights_only=True`, so
loading never unpickles arbitrary objects. A model without pretrained weights is built with a seeded random
init, so every process that loads it gets the same weights (a resumed featurization stays consistent).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import _find_checkpoint_in_dir, load_checkpoint
from open_clip.pretrained import _clean_tag
from torch import nn

from chips_core.errors import ChipsError
from chips_core.features.adapters import EndpointAdapter
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, atomic_write_bytes

CONFIG_DIR = Path(__file__).parent / "model_configs"
FIXTURES_DIR = Path(__file__).resolve().parents[2] / "data" / "fixtures"
_FIXTURE_PREFIX = "chips-fixture:"
_SCHEMAS = ("hf-hub:", "local-dir:")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_registered = False


class ModelLoadError(ChipsError):
    """A model could not be loaded; the message names the model or file and the cause."""


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two loaded models the same: architecture, weights tag, checkpoint file and its hash."""

    name: str
    pretrained: str | None = None  # open_clip tag, or 'random-init:seed=N' for unpretrained weights
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None

    def label(self) -> str:
        """A short human-readable label."""
        if self.checkpoint:
            return f"{self.name} @ {Path(self.checkpoint).name} ({self.checkpoint_sha256[:12]})"
        return f"{self.name} ({self.pretrained})" if self.pretrained else self.name


@dataclass
class LoadedModel:
    """An open_clip model ready for featurization, with everything needed to feed it and score it."""

    model: nn.Module
    preprocess: Any  # PIL image -> (3, H, W) float tensor (open_clip's eval transform)
    tokenizer: Any  # list[str] -> (B, context_length) int64 tensor
    adapter: EndpointAdapter
    identity: ModelIdentity
    device: torch.device

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's preprocess config: size, mean, std, interpolation, resize_mode."""
        return open_clip.get_model_preprocess_cfg(self.model)

    @functools.cached_property
    def d_v(self) -> int:
        """Width of the image features h (without a bias column)."""
        return self.adapter.endpoint_params().d_v

    @functools.cached_property
    def d_t(self) -> int:
        """Width of the text features t (without a bias column)."""
        return self.adapter.endpoint_params().d_t

    def gpu_preprocess_supported(self) -> bool:
        """Whether `decode_jpegs` reproduces the eval preprocessing ('shortest' square or 'squash')."""
        cfg = self.preprocess_cfg
        mode = cfg.get("resize_mode", "shortest")
        return mode == "squash" or (mode == "shortest" and self.image_size[0] == self.image_size[1])

    @torch.no_grad()
    def decode_jpegs(self, data: list[torch.Tensor]) -> torch.Tensor:
        """JPEG bytes (1-D uint8 CPU tensors) -> (n, 3, H, W) model input on this model's device.

        nvJPEG decoding on CUDA, then open_clip's eval transform with torchvision's tensor ops (same
        resize semantics and antialiased interpolation as its PIL path; pixel values may differ by rounding).
        """
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tvf

        if not self.gpu_preprocess_supported():
            raise ModelLoadError(
                f"{self.identity.label()}: GPU preprocessing needs resize_mode 'squash' or a square "
                "'shortest' image size"
            )
        cfg = self.preprocess_cfg
        interp = (
            InterpolationMode.BILINEAR
            if cfg.get("interpolation") == "bilinear"
            else InterpolationMode.BICUBIC
        )
        squash = cfg.get("resize_mode", "shortest") == "squash"
        mean = torch.tensor(cfg["mean"], device=self.device)[:, None, None]
        std = torch.tensor(cfg["std"], device=self.device)[:, None, None]
        with warnings.catch_warnings():  # torchvision.io decoding is deprecated in favour of torchcodec
            warnings.simplefilter("ignore")
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        out = torch.empty((len(decoded), 3, *self.image_size), device=self.device)
        for k, img in enumerate(decoded):
            size = list(self.image_size) if squash else self.image_size[0]
            img = tvf.resize(img, size, interpolation=interp, antialias=True)
            img = tvf.center_crop(img, list(self.image_size))
            out[k] = (img.float() / 255.0 - mean) / std
        return out

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-projection features (h, t) of one batch, through the model's own forward code."""
        return self.adapter.image_features(images), self.adapter.text_features(tokens)


def register_model_configs() -> None:
    """Register chips_core/features/model_configs/*.json with open_clip (idempotent).

    A config may name a bundled test fixture as `chips-fixture:<dir>` (e.g. the tiny BERT text tower);
    that entry is resolved to data/fixtures/<dir> and the resolved copy is registered.
    """
    global _registered
    if _registered:
        return
    for path in sorted(CONFIG_DIR.glob("*.json")):
        text = path.read_text()
        if _FIXTURE_PREFIX in text:
            resolved = text.replace(_FIXTURE_PREFIX, str(FIXTURES_DIR) + os.sep)
            digest = hashlib.sha256(resolved.encode()).hexdigest()[:16]
            out = Path(tempfile.gettempdir()) / f"chips-model-configs-{os.getuid()}" / digest / path.name
            if not out.exists():
                atomic_write_bytes(out, resolved.encode())
            open_clip.add_model_config(out)
        else:
            open_clip.add_model_config(path)
    _registered = True


def register_model(ws: Workspace, identity: ModelIdentity) -> int:
    """The `models` row id of this identity (same name, tag and checkpoint hash), inserted when new."""
    with ws.connect() as con:
        found = catalog.find_model_id(con, identity.name, identity.pretrained, identity.checkpoint_sha256)
        if found is not None:
            return found
        model_id = ws.next_id(con)
        catalog.insert_model(
            con,
            catalog.ModelSpec(
                model_id, identity.name, identity.pretrained, identity.checkpoint, identity.checkpoint_sha256
            ),
        )
        return model_id


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available; 'cuda' without a GPU is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but torch sees no CUDA device")
    return dev


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _looks_like_file(s: str | None) -> bool:
    return bool(s) and (os.path.isfile(s) or s.endswith(_CHECKPOINT_SUFFIXES) or os.sep in s)


def checkpoint_model_name(path: Path) -> str:
    """The open_clip model name of a checkpoint from its sidecar.

    Looked up in `<checkpoint>.json` (`{"model": "..."}`) and then in open_clip_train's `params.txt`
    (line `model: NAME`) next to the checkpoint or one folder up (logs/<run>/checkpoints/epoch_N.pt).
    """
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        try:
            return str(json.loads(sidecar.read_text())["model"])
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"sidecar {sidecar} must be JSON with a 'model' key: {exc}") from exc
    for params in (path.parent / "params.txt", path.parent.parent / "params.txt"):
        if params.is_file():
            for line in params.read_text().splitlines():
                key, _, value = line.partition(": ")
                if key == "model" and value.strip():
                    return value.strip()
    raise ModelLoadError(
        f"checkpoint {path}: no model name given and no sidecar found ({sidecar.name} with "
        '{"model": NAME}, or open_clip_train\'s params.txt); pass the model name explicitly'
    )


def load_model(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load an open_clip model for scoring.

    - `load_model("ViT-B-16", "openai")`: open_clip name + pretrained tag (downloads need network);
    - `load_model("ViT-B-16", "/path/epoch_5.pt")` or `load_model("/path/epoch_5.pt")`: a local checkpoint
      as open_clip_train writes it (`{"state_dict": ...}`, "module." prefixes allowed), the model name
      from the argument or the sidecar (see `checkpoint_model_name`);
    - `load_model("hf-hub:org/repo")`: passed to open_clip (offline, only from the local HF cache);
    - `load_model("chips-tiny-vit")`: no weights: seeded random init (`seed`), recorded as such.
    Raises ModelLoadError (unknown name, missing/invalid file, offline) or
    adapters.UnsupportedModelError (an architecture the CHIPS math does not cover).
    """
    register_model_configs()
    dev = resolve_device(device)
    checkpoint: Path | None = None
    name_is_file = pretrained is None and _looks_like_file(name) and not name.startswith(_SCHEMAS)
    if name_is_file or (pretrained is not None and _looks_like_file(pretrained)):
        checkpoint = Path(name if name_is_file else pretrained)
        if not checkpoint.is_file():
            raise ModelLoadError(f"checkpoint file not found: {checkpoint}")
        checkpoint = checkpoint.resolve()
        if name_is_file:
            name = checkpoint_model_name(checkpoint)
    is_hub = name.startswith("hf-hub:")
    is_local_dir = name.startswith("local-dir:")
    if is_local_dir:
        checkpoint = _local_dir_checkpoint(Path(name.removeprefix("local-dir:")))
    elif not is_hub and name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown open_clip model '{name}' (see open_clip.list_models() and {CONFIG_DIR})"
        )

    tag = None if (checkpoint is not None or is_hub) else pretrained
    if tag is not None:
        check_pretrained_tag(name, tag)
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, device="cpu", pretrained_text=False
            )
        except Exception as exc:  # noqa: BLE001 - open_clip/hf raise many types; re-raised with context
            raise ModelLoadError(_explain(name, tag, exc)) from exc
    sha = None
    if checkpoint is not None:
        sha = sha256_file(checkpoint)
    if checkpoint is not None and not is_local_dir:  # local-dir: open_clip loaded the weights already
        try:
            load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"checkpoint {checkpoint} cannot be loaded into '{name}': {exc}") from exc
    model.eval().to(dev)
    weights_from_elsewhere = is_hub or checkpoint is not None
    tag_label = None if weights_from_elsewhere else (tag or f"random-init:seed={seed}")
    identity = ModelIdentity(name, tag_label, str(checkpoint) if checkpoint else None, sha)
    adapter = EndpointAdapter(model, identity.label())
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(model, preprocess, tokenizer, adapter, identity, dev)


def pretrained_tags(name: str) -> list[str]:
    """open_clip's pretrained tags of a model name (empty for configs without published weights)."""
    return list(open_clip.list_pretrained_tags_by_model(name))


def check_pretrained_tag(name: str, tag: str) -> None:
    """Raise ModelLoadError naming the valid tags when `tag` is not one of `name`'s pretrained tags."""
    tags = pretrained_tags(name)
    if _clean_tag(tag) in {_clean_tag(t) for t in tags}:
        return
    if tags:
        raise ModelLoadError(
            f"unknown pretrained tag '{tag}' for model '{name}'; valid tags: {', '.join(tags)} "
            "(or pass a checkpoint file)"
        )
    raise ModelLoadError(
        f"unknown pretrained tag '{tag}' for model '{name}': open_clip has no pretrained weights for "
        "this model; pass a checkpoint file, or no --pretrained for a seeded random init"
    )


def check_weights_choice(name: str, pretrained: str | None, random_init: bool) -> None:
    """Refuse random weights that were not asked for: a model with published pretrained tags needs
    `pretrained` (a tag or checkpoint) unless `random_init`; `random_init` with `pretrained` is a conflict.
    Checkpoint files, `local-dir:` and `hf-hub:` models carry their weights and pass."""
    if random_init and pretrained is not None:
        raise ModelLoadError("--random-init and --pretrained exclude each other")
    if pretrained is not None or random_init or name.startswith(_SCHEMAS) or _looks_like_file(name):
        return
    register_model_configs()
    tags = pretrained_tags(name)
    if tags:
        raise ModelLoadError(
            f"model '{name}' has pretrained weights ({', '.join(tags)}) but no --pretrained was given; "
            "pass --pretrained TAG (or a checkpoint file), or --random-init to use random weights on purpose"
        )


class _OpenClipFactoryFilter(logging.Filter):
    """Drops open_clip factory's root-logger warnings and errors: load_model reports the outcome itself
    ("Model initialized randomly" is wrong when a checkpoint is loaded afterwards; a failed download or an
    unknown tag becomes a ModelLoadError with its explanation)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.WARNING
            and record.pathname.replace(os.sep, "/").endswith("open_clip/factory.py")
        )


@contextlib.contextmanager
def _quiet_open_clip():
    root = logging.getLogger()
    filt = _OpenClipFactoryFilter()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _local_dir_checkpoint(folder: Path) -> Path:
    """The weights file open_clip loads from a 'local-dir:' bundle (open_clip_config.json + a checkpoint)."""
    if not (folder / "open_clip_config.json").is_file():
        raise ModelLoadError(f"local-dir:{folder}: no open_clip_config.json in that folder")
    found = _find_checkpoint_in_dir(folder)
    if found is None:
        raise ModelLoadError(f"local-dir:{folder}: no checkpoint file (*.safetensors, *.bin, *.pth)")
    return Path(found).resolve()


def _explain(name: str, tag: str | None, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    what = f"'{name}'" + (f" with pretrained '{tag}'" if tag else "")
    msg = f"could not load open_clip model {what}: {type(exc).__name__}: {exc}"
    if name.startswith("hf-hub:") or tag:
        msg += (
            " — the weights are not in the local cache and HF_HUB_OFFLINE=1 forbids downloading"
            if offline
            else " — the weights must be downloaded (network) or already be in the local cache"
        )
    return msg
