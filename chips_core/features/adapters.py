"""Endpoint adapters: where each open_clip tower type keeps its final linear map (METHOD.md §1).

An adapter gives the raw pre-projection features h, t of a batch by running the model's OWN forward
code (`encode_image` / `encode_text`) with the projection switched off or observed:
- a projection stored as a Parameter (`visual.proj`, `text_projection`, used as `x @ P`) is set to None
  for the duration of the call, which open_clip's forward code treats as "no projection";
- a projection that is a final `nn.Linear` (timm and HF towers, `proj_bias` text towers of CustomTextCLIP)
  is observed with a forward pre-hook that records its input.
Nothing below the endpoint is re-implemented here. `endpoint_params()` returns the same maps as
`chips_core.scoring.endpoint.EndpointParams` (W = proj.T, or the Linear weight with its bias as last column).
Towers whose projection cannot be isolated this way are refused with a message naming the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

from chips_core.errors import ChipsError
from chips_core.scoring.endpoint import EndpointParams

Encode = Callable[[torch.Tensor], torch.Tensor]  # the model's encode_image / encode_text


class UnsupportedModelError(ChipsError, ValueError):
    """The model's architecture has no endpoint the CHIPS math supports; the message says why."""


class TowerEndpoint:
    """The final linear map of one tower and the way to read the features entering it."""

    #: names of the model parameters that form the endpoint, in `model.named_parameters()` spelling
    param_names: tuple[str, ...]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def features(self, encode: Encode, x: torch.Tensor) -> torch.Tensor:
        """Pre-projection features of `x` through `encode` (the model's own encode function)."""
        raise NotImplementedError

    def weight(self) -> tuple[torch.Tensor, bool]:
        """(W of shape (D, d[+1]), has_bias) as a detached copy."""
        raise NotImplementedError


class _ParamProjection(TowerEndpoint):
    """A projection Parameter P used as `x @ P`; switched off by setting the attribute to None."""

    def __init__(self, model: nn.Module, owner: nn.Module, attr: str, prefix: str) -> None:
        super().__init__(model)
        self.owner, self.attr = owner, attr
        self.param_names = (f"{prefix}{attr}",)

    @contextlib.contextmanager
    def _off(self) -> Iterator[None]:
        saved = getattr(self.owner, self.attr)
        setattr(self.owner, self.attr, None)
        try:
            yield
        finally:
            setattr(self.owner, self.attr, saved)

    def features(self, encode: Encode, x: torch.Tensor) -> torch.Tensor:
        with self._off():
            return encode(x)

    def weight(self) -> tuple[torch.Tensor, bool]:
        proj = getattr(self.owner, self.attr)
        if isinstance(proj, nn.Linear):
            return _linear_weight(proj)
        return proj.detach().T.clone(), False


class _LinearProjection(TowerEndpoint):
    """A final nn.Linear; its input is recorded with a forward pre-hook while the model runs."""

    def __init__(self, model: nn.Module, linear: nn.Linear) -> None:
        super().__init__(model)
        self.linear = linear
        prefix = next(n for n, m in model.named_modules() if m is linear)
        self.param_names = tuple(f"{prefix}.{n}" for n, _ in linear.named_parameters())

    def features(self, encode: Encode, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = self.linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            encode(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"endpoint Linear ran {len(seen)} times in one forward pass (expected once)")
        return seen[0]

    def weight(self) -> tuple[torch.Tensor, bool]:
        return _linear_weight(self.linear)


def _linear_weight(linear: nn.Linear) -> tuple[torch.Tensor, bool]:
    W = linear.weight.detach()
    if linear.bias is None:
        return W.clone(), False
    return torch.cat([W, linear.bias.detach()[:, None]], dim=1), True


# --- one class per tower type -------------------------------------------------------------------


class NativeVisionEndpoint(_ParamProjection):
    """open_clip VisionTransformer: `visual.proj` (width, D)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        visual = model.visual
        if visual.proj is None:
            raise UnsupportedModelError(
                f"{name}: the VisionTransformer has no projection (visual.proj is None)"
            )
        super().__init__(model, visual, "proj", "visual.")


class NativeTextEndpoint(_ParamProjection):
    """open_clip text transformer: `text_projection` as Parameter (width, D) or nn.Linear (proj_bias)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        owner, prefix = (model.text, "text.") if isinstance(model, CustomTextCLIP) else (model, "")
        proj = owner.text_projection
        if proj is None:
            raise UnsupportedModelError(f"{name}: the text tower has no projection (text_projection is None)")
        super().__init__(model, owner, "text_projection", prefix)
        if isinstance(proj, nn.Linear):
            self.param_names = tuple(f"{prefix}text_projection.{n}" for n, _ in proj.named_parameters())


def _final_linear(head: nn.Module) -> nn.Linear | None:
    """The nn.Linear that is the last computation of a projection head, or None."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential):
        mods = [m for m in head if not isinstance(m, nn.Dropout | nn.Identity)]
        return _final_linear(mods[-1]) if mods else None
    fc2, drop2 = getattr(head, "fc2", None), getattr(head, "drop2", nn.Identity())
    if isinstance(fc2, nn.Linear) and isinstance(drop2, nn.Dropout | nn.Identity):  # timm Mlp
        return fc2
    return None


class TimmVisionEndpoint(_LinearProjection):
    """open_clip TimmModel with `timm_proj` 'linear' (head.proj) or 'mlp' (its final head.mlp.fc2)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        head = model.visual.head
        linear = None
        if "proj" in head._modules:
            linear = _final_linear(head.proj)
        elif "mlp" in head._modules:
            linear = _final_linear(head.mlp)
        if linear is None:
            raise UnsupportedModelError(
                f"{name}: timm tower without a final Linear projection head (timm_proj must be 'linear' "
                "or 'mlp'; with an attention pool alone the projection runs inside the pool, and with "
                "'none' it is the timm classifier: neither is supported)"
            )
        super().__init__(model, linear)


class HFTextEndpoint(_LinearProjection):
    """open_clip HFTextEncoder with `hf_proj_type` 'linear' or 'mlp' (the MLP's final Linear)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        linear = _final_linear(model.text.proj)
        if linear is None:
            raise UnsupportedModelError(
                f"{name}: HF text tower projection {type(model.text.proj).__name__} has no final nn.Linear "
                "(an identity projection has no endpoint parameters; set hf_proj_type 'linear' or 'mlp')"
            )
        super().__init__(model, linear)


# --- the whole model ----------------------------------------------------------------------------


class EndpointAdapter:
    """Both towers' endpoints and the logit scale of one open_clip CLIP / CustomTextCLIP model."""

    def __init__(self, model: nn.Module, name: str = "model") -> None:
        self.model, self.name = model, name
        if not isinstance(model, CLIP | CustomTextCLIP):
            raise UnsupportedModelError(
                f"{name}: model class {type(model).__name__} is not supported (CHIPS scores the "
                "contrastive loss of open_clip CLIP / CustomTextCLIP models; CoCa's captioning loss is "
                "not implemented)"
            )
        if getattr(model, "logit_bias", None) is not None:
            raise UnsupportedModelError(
                f"{name}: the model has a logit_bias (SigLIP sigmoid loss); only the InfoNCE loss "
                "is implemented"
            )
        self.vision = _vision_endpoint(model, name)
        self.text = _text_endpoint(model, name)

    @property
    def kind(self) -> str:
        """A short label such as 'NativeVision+HFText'."""
        v, t = (type(e).__name__.removesuffix("Endpoint") for e in (self.vision, self.text))
        return f"{v}+{t}"

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """h (B, d_v): image features entering the vision projection, through `model.encode_image`."""
        return self.vision.features(self.model.encode_image, images)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """t (B, d_t): text features entering the text projection, through `model.encode_text`."""
        return self.text.features(self.model.encode_text, tokens)

    def endpoint_params(self) -> EndpointParams:
        """The endpoint ϑ = (W_v, W_t, θ) as detached copies in the model's dtype."""
        W_v, v_bias = self.vision.weight()
        W_t, t_bias = self.text.weight()
        theta = self.model.logit_scale.detach().reshape(()).clone()
        return EndpointParams(W_v, W_t, theta, v_bias=v_bias, t_bias=t_bias)

    def param_names(self) -> dict[str, tuple[str, ...]]:
        """The model's own parameter names behind W_v, W_t and θ (for functional_call references)."""
        return {"W_v": self.vision.param_names, "W_t": self.text.param_names, "logit_scale": ("logit_scale",)}


def _vision_endpoint(model: nn.Module, name: str) -> TowerEndpoint:
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        raise UnsupportedModelError(
            f"{name}: ModifiedResNet vision towers are not supported: their projection (attnpool.c_proj) "
            "runs inside F.multi_head_attention_forward, where no hook can observe its input"
        )
    if isinstance(visual, VisionTransformer):
        return NativeVisionEndpoint(model, name)
    if isinstance(visual, TimmModel):
        return TimmVisionEndpoint(model, name)
    raise UnsupportedModelError(f"{name}: vision tower {type(visual).__name__} is not supported")


def _text_endpoint(model: nn.Module, name: str) -> TowerEndpoint:
    if isinstance(model, CLIP):
        return NativeTextEndpoint(model, name)
    text = model.text
    if isinstance(text, TextTransformer):
        if text.cls_emb is not None:
            raise UnsupportedModelError(
                f"{name}: text tower with an appended CLS embedding (CoCa) is not supported"
            )
        return NativeTextEndpoint(model, name)
    if isinstance(text, HFTextEncoder):
        return HFTextEndpoint(model, name)
    raise UnsupportedModelError(f"{name}: text tower {type(text).__name__} is not supported")
