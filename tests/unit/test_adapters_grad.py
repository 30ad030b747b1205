"""Every supported endpoint adapter against the model itself, in float64.

(a) normalize(W h) from the adapter's features and EndpointParams equals the model's own normalized
    encode_image / encode_text output;
(b) the closed-form per-sample gradients of chips_core.scoring.endpoint (all negatives and self-only) equal
    torch.func.jacrev of the per-sample loss vector of the MODEL's forward pass, taken w.r.t. the model's
    real endpoint parameters (functional_call on visual.proj / the Linear weight+bias / logit_scale).
Unsupported towers are refused with a message naming the model and the reason.
"""

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from open_clip.tokenizer import HFTokenizer
from torch.func import functional_call, jacrev

from chips_core.features.adapters import EndpointAdapter, UnsupportedModelError
from chips_core.features.models import FIXTURES_DIR, LoadedModel, ModelIdentity, load_model
from chips_core.scoring import endpoint

pytestmark = pytest.mark.unit

CAPTIONS = ["a chest x ray", "the moon", "a cat on a slide", "brain mri axial view", "coffee", "digit seven"]
SUPPORTED = [
    "chips-tiny-vit",
    "chips-tiny-timm",
    "chips-tiny-hf",
    "timm-mlp",
    "hf-linear",
    "custom-text-bias",
]
_VIT = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32)


def _built(kind: str) -> LoadedModel:
    """Tower variants without a registered config, built directly (seeded random init)."""
    torch.manual_seed(0)
    native = CLIPTextCfg(context_length=32, vocab_size=49408, width=32, heads=2, layers=1, proj_bias=True)
    hf = CLIPTextCfg(hf_model_name=str(FIXTURES_DIR / "tiny-bert"), hf_model_pretrained=False,
                     hf_proj_type="linear", hf_pooler_type="mean_pooler")  # fmt: skip
    if kind == "timm-mlp":  # timm Mlp head: the endpoint is its final fc2 (with bias)
        vis = CLIPVisionCfg(
            timm_model_name="test_convnext", timm_proj="mlp", timm_proj_bias=True, image_size=32
        )
        model, tok = CLIP(48, vis, native), open_clip.get_tokenizer("chips-tiny-vit")
    elif kind == "hf-linear":
        model, tok = (
            CustomTextCLIP(48, _VIT, hf),
            HFTokenizer(str(FIXTURES_DIR / "tiny-bert"), context_length=32),
        )
    else:  # CustomTextCLIP with a native text tower whose projection is an nn.Linear with bias
        model, tok = CustomTextCLIP(48, _VIT, native), open_clip.get_tokenizer("chips-tiny-vit")
    model.eval()
    return LoadedModel(
        model, None, tok, EndpointAdapter(model, kind), ModelIdentity(kind), torch.device("cpu")
    )


@pytest.fixture(scope="module", params=SUPPORTED)
def loaded(request):
    lm = load_model(request.param) if request.param.startswith("chips-") else _built(request.param)
    lm.model.double().requires_grad_(False)
    with torch.no_grad():  # a temperature away from the init value, so θ's gradient is not special
        lm.model.logit_scale.fill_(2.3)
    return lm


def _batch(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(CAPTIONS), 3, *lm.image_size, generator=g, dtype=torch.float64)
    return images, lm.tokenizer(CAPTIONS)


def _loss_vector(image_emb, text_emb, scale):
    """Symmetric InfoNCE per sample from the model's normalized outputs (METHOD.md §2)."""
    S = scale * image_emb @ text_emb.T
    d = S.diagonal()
    return 0.5 * (torch.logsumexp(S, 1) - d) + 0.5 * (torch.logsumexp(S, 0) - d)


def _block(jac: dict, names: tuple[str, ...]) -> torch.Tensor:
    """Per-sample Jacobian blocks in EndpointParams layout: (B, D, d[+1])."""
    if len(names) == 1 and names[0].endswith(("proj", "text_projection")):  # Parameter used as x @ P
        return jac[names[0]].transpose(1, 2)
    weight = next(jac[n] for n in names if n.endswith("weight"))
    bias = [jac[n] for n in names if n.endswith("bias")]
    return torch.cat([weight, bias[0][:, :, None]], dim=2) if bias else weight


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_features_reproduce_the_models_embeddings(loaded):
    images, tokens = _batch(loaded)
    params = loaded.adapter.endpoint_params()
    h, t = loaded.encode(images, tokens)
    assert h.dtype == torch.float64 and h.shape == (len(CAPTIONS), params.d_v) and t.shape[1] == params.d_t
    _, _, X, Y, _, _ = endpoint.embed(h, t, params)
    with torch.no_grad():
        x_model = loaded.model.encode_image(images, normalize=True)
        y_model = loaded.model.encode_text(tokens, normalize=True)
    assert _rel(X, x_model) < 1e-12 and _rel(Y, y_model) < 1e-12
    # the projection really was switched off/observed, not skipped: h is not the projected embedding
    with torch.no_grad():
        v_model = loaded.model.encode_image(images)
    assert h.shape != v_model.shape or not torch.allclose(h, v_model)


@pytest.mark.parametrize("negatives", ["all", "self"])
def test_closed_form_grads_match_autograd_of_the_model(loaded, negatives):
    images, tokens = _batch(loaded, seed=1)
    adapter = loaded.adapter
    names = adapter.param_names()
    model_params = dict(loaded.model.named_parameters())
    primal = {n: model_params[n].detach().clone() for group in names.values() for n in group}

    def losses(p):
        x, y, scale = functional_call(loaded.model, p, (images, tokens))
        if negatives == "self":  # negatives frozen: the other pairs' embeddings are constants of ϑ
            return _self_only(x, y, scale)
        return _loss_vector(x, y, scale)

    jac = jacrev(losses)(primal)
    G_v = _block(jac, names["W_v"])
    G_t = _block(jac, names["W_t"])
    g_theta = jac["logit_scale"].reshape(len(CAPTIONS))

    h, t = loaded.encode(images, tokens)
    params = adapter.endpoint_params()
    closed = endpoint.per_sample_grads(h, t, params, negatives=negatives)
    assert closed.G_v.shape == G_v.shape and closed.G_t.shape == G_t.shape
    assert _rel(closed.G_v, G_v) < 1e-8
    assert _rel(closed.G_t, G_t) < 1e-8
    assert _rel(closed.g_theta, g_theta) < 1e-8
    # slightly wrong features must not pass: the check can fail
    t_off = t + 1e-3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=t.dtype)
    assert _rel(endpoint.per_sample_grads(h, t_off, params, negatives=negatives).G_t, G_t) > 1e-6


def _self_only(x, y, scale):
    """ℓ_i with the other pairs' embeddings (x_a, y_b; a, b ≠ i) frozen: the 'self-only' gradient's loss.

    Its gradient keeps r_i h_iᵀ and q_i t_iᵀ; θ still enters every logit, so its component stays whole.
    """
    x0, y0 = x.detach(), y.detach()
    out = []
    for i in range(x.shape[0]):
        xi = torch.cat([x0[:i], x[i : i + 1], x0[i + 1 :]])
        yi = torch.cat([y0[:i], y[i : i + 1], y0[i + 1 :]])
        out.append(_loss_vector(xi, yi, scale)[i])
    return torch.stack(out)


# --- refusals -------------------------------------------------------------------------------------

_TEXT = CLIPTextCfg(context_length=16, vocab_size=1000, width=32, heads=2, layers=1)


def _refusal(model, match):
    with pytest.raises(UnsupportedModelError, match=match) as info:
        EndpointAdapter(model, "my-model")
    assert "my-model" in str(info.value)


def test_modified_resnet_is_refused():
    model = CLIP(32, CLIPVisionCfg(layers=[1, 1, 1, 1], width=8, head_width=8, image_size=32), _TEXT)
    _refusal(model, "ModifiedResNet.*multi_head_attention_forward")


def test_logit_bias_is_refused():
    model = CLIP(
        32,
        CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        _TEXT,
        init_logit_bias=-10.0,
    )
    _refusal(model, "logit_bias.*SigLIP")


def test_towers_without_a_projection_are_refused():
    vit = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    no_text_proj = CLIPTextCfg(
        context_length=16, vocab_size=1000, width=32, heads=2, layers=1, proj_type="none"
    )
    _refusal(CLIP(32, vit, no_text_proj), "text tower has no projection")
    timm_none = CLIPVisionCfg(timm_model_name="test_vit", timm_proj="none", image_size=160)
    _refusal(CLIP(32, timm_none, _TEXT), "timm tower without a final Linear")
    hf_identity = CLIPTextCfg(
        hf_model_name=str(FIXTURES_DIR / "tiny-bert"),
        hf_model_pretrained=False,
        hf_proj_type=None,
        hf_pooler_type="cls_last_hidden_state_pooler",
    )
    _refusal(CustomTextCLIP(32, vit, hf_identity), "Identity has no final nn.Linear")


def test_mlp_head_without_final_linear_is_refused():
    vit = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    hf = CLIPTextCfg(
        hf_model_name=str(FIXTURES_DIR / "tiny-bert"),
        hf_model_pretrained=False,
        hf_proj_type="mlp",
        hf_pooler_type="cls_last_hidden_state_pooler",
    )
    model = CustomTextCLIP(32, vit, hf)
    model.text.proj.append(torch.nn.GELU())  # an MLP head that ends in a nonlinearity
    _refusal(model, "Sequential has no final nn.Linear")


def test_coca_is_refused():
    from open_clip.coca_model import CoCa, MultimodalCfg

    vit = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    model = CoCa(
        32, MultimodalCfg(width=32, heads=2, layers=1, context_length=16, vocab_size=1000), _TEXT, vit
    )
    _refusal(model, "CoCa is not supported.*captioning loss")
