"""prepare's inner loop at ViT-B/16 endpoint dims: closed-form per-sample gradients + sketch, pairs/s.

d_v = 768, d_t = 512, D = 512 (p = 655,361), B = 1024, all in-batch negatives, Kronecker k = 2048 by
default; also the curvature step (sampled negatives, k×k accumulation) per curvature batch. With
`--device cuda` it also times per-sample gradients of a whole small ViT (open_clip ViT-B-16, random
init) with torch.func.vmap, TRAK's way, for the side-by-side figure. Features are random: the cost does
not depend on their values. Run: PYTHONPATH=. python bench/bench_prepare.py [--device cpu|cuda]
[--k 2048] [--batches 3] [--negatives all|self] [--sketch kronecker|dense]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from chips_core.scoring.curvature import CurvatureAccumulator
from chips_core.scoring.endpoint import EndpointParams, batch_state
from chips_core.scoring.sketch import make_sketch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_closed_form(a: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(step, wall s, process CPU s) rows; CPU time tells the cost on a shared, busy machine."""
    dev, dt = a.device, torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    params = EndpointParams(
        torch.randn(a.D, a.d_v, generator=g) / a.d_v**0.5,
        torch.randn(a.D, a.d_t, generator=g) / a.d_t**0.5,
        torch.tensor(4.6),
    ).to(dev, dt)
    sk = make_sketch(a.sketch, params, a.k, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    sk.factors(dev, dt) if a.sketch == "kronecker" else sk.matrix(dev, dt)
    gen_s, gen_c = time.perf_counter() - t0, time.process_time() - c0
    feats = [
        (
            torch.randn(a.B, a.d_v, generator=g).to(dev, torch.float16),
            torch.randn(a.B, a.d_t, generator=g).to(dev, torch.float16),
        )
        for _ in range(a.batches + 1)
    ]
    rows = [(f"sketch generation ({a.sketch}, k={a.k}, once)", gen_s, gen_c)]
    for i, (h, t) in enumerate(feats):  # first batch is warm-up
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        st = batch_state(h.to(dt), t.to(dt), params)
        G = sk.batch_grads(st, a.negatives).to(torch.float16).cpu()
        _sync(dev)
        if i:
            rows.append(("grads+sketch", time.perf_counter() - t0, time.process_time() - c0))
    del G
    acc = CurvatureAccumulator(a.k, K=8, seed=0)
    for i, (h, t) in enumerate(feats[:2]):
        st = batch_state(h.to(dt), t.to(dt), params)
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        acc.add(sk, st, i)
        _sync(dev)
        if i:
            rows.append(
                ("curvature (K=8) per curvature batch", time.perf_counter() - t0, time.process_time() - c0)
            )
    return rows


def bench_vmap_whole_model(a: argparse.Namespace, n: int = 16) -> float:
    """pairs/s of per-sample gradients of all ViT-B-16 parameters via torch.func (loss: InfoNCE row of
    each pair against the batch's detached text embeddings)."""
    import open_clip
    from torch.func import functional_call, grad, vmap

    model = open_clip.create_model("ViT-B-16", pretrained=None).to(a.device).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    img = torch.randn(n, 3, 224, 224, device=a.device)
    tok = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat"] * n).to(a.device)
    with torch.no_grad():
        neg = torch.nn.functional.normalize(model.encode_text(tok), dim=-1)

    def loss(p, x, t):
        out = functional_call(model, p, (x[None], t[None]))
        xi, yi, s = out["image_features"], out["text_features"], out["logit_scale"]
        logits = s * xi @ torch.cat([yi, neg]).T
        return torch.logsumexp(logits, -1).sum() - logits[0, 0]

    f = vmap(grad(loss), in_dims=(None, 0, 0))
    f(params, img[:2], tok[:2])
    _sync(a.device)
    t0 = time.perf_counter()
    f(params, img, tok)
    _sync(a.device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sketch", default="kronecker")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--B", type=int, default=1024)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--d-v", dest="d_v", type=int, default=768)
    ap.add_argument("--d-t", dest="d_t", type=int, default=512)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--negatives", default="all")
    a = ap.parse_args()
    print(
        f"device {a.device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}; D={a.D} d_v={a.d_v} d_t={a.d_t} B={a.B} k={a.k} "
        f"{a.sketch} negatives={a.negatives}"
    )
    rows = bench_closed_form(a)
    per_batch = [(s, c) for name, s, c in rows if name == "grads+sketch"]
    print("\n| step | wall s | CPU s | pairs/s (wall) |")
    print("|---|---|---|---|")
    for name, s, c in rows:
        rate = f"{a.B / s:,.0f}" if name != rows[0][0] else "—"
        print(f"| {name} | {s:.3f} | {c:.3f} | {rate} |")
    best, cpu = min(per_batch)
    print(
        f"| **closed-form {a.negatives}-negatives grads + {a.sketch} sketch (best batch)** | {best:.3f} | "
        f"{cpu:.3f} | **{a.B / best:,.0f}** |"
    )
    if a.device.startswith("cuda"):
        rate = bench_vmap_whole_model(a)
        print(
            f"| whole-model per-sample grads, torch.func vmap (ViT-B-16, TRAK's way) | — | — | {rate:,.0f} |"
        )


if __name__ == "__main__":
    main()
