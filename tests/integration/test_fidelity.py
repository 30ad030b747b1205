"""Fidelity: the sketched CHIPS score ranks pairs like the exact (no-sketch) score at the same λ.

Real images (random crops/flips of scikit-image's sample images, captions from their names) through a
small random-init open_clip model (chips-tiny-vit via chips_core.features.models), then prepare with the dense
sketch at k = 2048 and rank at the default λ* (d(λ*) = k/4), against CG in the full endpoint space.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDICAL = {
    "retina": "a fundus photograph of the retina",
    "microaneurysms": "a retinal image showing microaneurysms",
    "cell": "a microscopy image of a cell",
    "immunohistochemistry": "an immunohistochemistry stained tissue section",
}
GENERAL = {
    "astronaut": "a portrait of an astronaut",
    "camera": "a man holding a camera",
    "coffee": "a cup of coffee",
    "chelsea": "a photo of a cat",
    "rocket": "a rocket on a launch pad",
    "hubble_deep_field": "a telescope image of distant galaxies",
    "moon": "the surface of the moon",
    "page": "a scanned page of text",
    "coins": "old coins on a table",
    "brick": "a brick wall",
    "grass": "a patch of grass",
    "gravel": "a gravel road",
    "clock": "a clock on a wall",
    "colorwheel": "a color wheel",
}
TEMPLATES = ("{}", "{}, close up", "a picture: {}", "{} (cropped)")


def _crops(names: dict[str, str], n: int, rng: np.random.Generator) -> tuple[list[Image.Image], list[str]]:
    """n random crops/flips of the named skimage images, each with a caption from its name."""
    import skimage.data

    srcs = {}
    for name in names:
        a = np.asarray(getattr(skimage.data, name)())
        a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]
        srcs[name] = a.astype(np.uint8)
    images, captions = [], []
    keys = list(names)
    for _ in range(n):
        name = keys[rng.integers(len(keys))]
        a = srcs[name]
        H, W = a.shape[:2]
        s = rng.uniform(0.3, 1.0)
        h, w = max(8, int(H * s)), max(8, int(W * s))
        y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        crop = a[y : y + h, x : x + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        images.append(Image.fromarray(np.ascontiguousarray(crop)))
        captions.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(names[name]))
    return images, captions


def build_features(n_pool: int = 1024, n_eval: int = 128, seed: int = 0):
    """(pool ArrayFeatures, eval ArrayFeatures, EndpointParams) from chips-tiny-vit (random init, seeded)."""
    from chips_core.features.models import load_model
    from chips_core.scoring.prepare import ArrayFeatures

    rng = np.random.default_rng(seed)
    model = load_model("chips-tiny-vit", seed=seed)

    def encode(images, captions):
        hs, ts = [], []
        for s in range(0, len(images), 256):
            x = torch.stack([model.preprocess(im) for im in images[s : s + 256]])
            tok = model.tokenizer(captions[s : s + 256])
            h, t = model.encode(x, tok)
            hs.append(h.float().numpy())
            ts.append(t.float().numpy())
        return np.concatenate(hs).astype(np.float16), np.concatenate(ts).astype(np.float16)

    pool_imgs, pool_caps = _crops({**MEDICAL, **GENERAL}, n_pool, rng)
    ev_imgs, ev_caps = _crops(MEDICAL, n_eval, rng)
    hp, tp = encode(pool_imgs, pool_caps)
    he, te = encode(ev_imgs, ev_caps)
    ids = rng.choice(2**62, size=n_pool + n_eval, replace=False).astype(np.int64)
    pool = ArrayFeatures(ids[:n_pool], hp, tp)
    ev = ArrayFeatures(ids[n_pool:], he, te)
    return pool, ev, model.adapter.endpoint_params().to(dtype=torch.float64)


def test_sketched_matches_exact_at_default_lambda(tmp_path):
    """The sketched Newton score against the exact one (CG, same absolute λ): at the paper's λ* (d(λ*) =
    k/4, raw gradients, every block) and with the default preset's rank options (λ = 0.1·tr C̃, unit-norm
    gradients) on the same cache."""
    from chips_core.scoring.params import PrepareConfig, RankParams
    from chips_core.scoring.prepare import prepare
    from chips_core.scoring.ranking import rank, rank_exact

    pool, ev, params = build_features()
    cfg = PrepareConfig(
        k_max=2048, sketch="dense", batch_size=128, seed=0, negatives_per_row=4, chunk_batches=4,
        blocks="visual,text,temperature",
    )  # fmt: skip
    cache = prepare(pool, ev, params, cfg, tmp_path / "cache")
    paper = dict(damping="dimension", normalize=False, guard="none")
    sk = rank(cache, RankParams(k=2048, **paper))
    assert sk.info["d_over_k"] == pytest.approx(0.25, abs=1e-3)
    ex = rank_exact(cache, pool, params, RankParams(k=2048, lam=sk.info["lam"], **paper), tol=1e-6)
    assert ex.info["cg_rel_residual"] <= 1e-6
    rho = spearmanr(sk.frame["alignment"], ex.frame["alignment"]).statistic
    dot = spearmanr(
        sk.frame["alignment"], rank(cache, RankParams(method="dot", k=2048)).frame["score"]
    ).statistic
    print(f"Spearman(sketched, exact) {rho:.3f}, (sketched, Dot) {dot:.3f}, λ* {sk.info['lam']:.3g}")
    assert rho >= 0.9
    # the final scores (same weights on both) agree at least as well
    assert spearmanr(sk.frame["score"], ex.frame["score"]).statistic >= 0.9
    # the default preset's options: larger λ, unit-norm gradients
    sk_d = rank(cache, RankParams(k=2048, guard="none"))
    ex_d = rank_exact(cache, pool, params, RankParams(k=2048, lam=sk_d.info["lam"], guard="none"), tol=1e-6)
    rho_d = spearmanr(sk_d.frame["alignment"], ex_d.frame["alignment"]).statistic
    print(f"default options: Spearman(sketched, exact) {rho_d:.3f}, λ {sk_d.info['lam']:.3g}")
    assert rho_d >= 0.9
