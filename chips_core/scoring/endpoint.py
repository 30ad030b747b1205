"""Endpoint parameters and closed-form per-sample gradients of symmetric InfoNCE (METHOD.md §1–3).

The endpoint ϑ = {W_v, W_t, θ} is the only part of CLIP that scoring differentiates; everything below
it is frozen, so the math needs only the cached raw features h (image) and t (text). Every gradient here
is written in closed form from the rank-one structure of ∇S_ab, in log-space softmax and with 1 − P_ii
computed as Σ_{j≠i} P_ij so that confident pairs keep their tiny but nonzero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chips_core.scoring.params import BLOCKS, DEFAULT_BLOCKS, NEGATIVES, parse_blocks  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class EndpointParams:
    """W_v (D, d_v[+1]), W_t (D, d_t[+1]) (a bias is the last column), θ = log inverse temperature."""

    W_v: torch.Tensor
    W_t: torch.Tensor
    logit_scale: torch.Tensor
    v_bias: bool = False
    t_bias: bool = False

    def __post_init__(self) -> None:
        if self.W_v.ndim != 2 or self.W_t.ndim != 2:
            raise ValueError(
                f"W_v and W_t must be 2-D, got {tuple(self.W_v.shape)} and {tuple(self.W_t.shape)}"
            )
        if self.W_v.shape[0] != self.W_t.shape[0]:
            raise ValueError(f"W_v {tuple(self.W_v.shape)} and W_t {tuple(self.W_t.shape)} disagree on D")
        if self.logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(self.logit_scale.shape)}")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> EndpointParams:
        """A copy on another device / in another dtype (logit_scale becomes 0-dim)."""
        return EndpointParams(
            self.W_v.to(device=device, dtype=dtype),
            self.W_t.to(device=device, dtype=dtype),
            self.logit_scale.reshape(()).to(device=device, dtype=dtype),
            self.v_bias,
            self.t_bias,
        )

    @property
    def D(self) -> int:
        return int(self.W_v.shape[0])

    @property
    def d_v(self) -> int:
        """Raw image feature width (without the bias column)."""
        return int(self.W_v.shape[1]) - int(self.v_bias)

    @property
    def d_t(self) -> int:
        """Raw text feature width (without the bias column)."""
        return int(self.W_t.shape[1]) - int(self.t_bias)

    @property
    def p(self) -> int:
        """Dimension of ϑ: D·d_v' + D·d_t' + 1."""
        return int(self.W_v.numel() + self.W_t.numel() + 1)

    def flat(self) -> torch.Tensor:
        """ϑ as one vector, ordered like `EndpointGrads.flat`."""
        return torch.cat([self.W_v.reshape(-1), self.W_t.reshape(-1), self.logit_scale.reshape(1)])


@dataclass
class EndpointGrads:
    """Per-sample endpoint gradients: G_v (B, D, d_v'), G_t (B, D, d_t'), g_theta (B,)."""

    G_v: torch.Tensor
    G_t: torch.Tensor
    g_theta: torch.Tensor

    def flat(self) -> torch.Tensor:
        """(B, p) ordered [vec(G_v) row-major, vec(G_t), θ]."""
        B = self.g_theta.shape[0]
        return torch.cat(
            [self.G_v.reshape(B, -1), self.G_t.reshape(B, -1), self.g_theta.reshape(B, 1)], dim=1
        )


def mask_grads(g: EndpointGrads, blocks: tuple[str, ...]) -> EndpointGrads:
    """g with the blocks not in `blocks` set to zero: its coordinates in the scored subspace."""
    return EndpointGrads(
        g.G_v if "visual" in blocks else torch.zeros_like(g.G_v),
        g.G_t if "text" in blocks else torch.zeros_like(g.G_t),
        g.g_theta if "temperature" in blocks else torch.zeros_like(g.g_theta),
    )


def augment(feats: torch.Tensor, bias: bool) -> torch.Tensor:
    """Append a ones column when the endpoint Linear has a bias (its input is then [f, 1])."""
    if not bias:
        return feats
    return torch.cat([feats, feats.new_ones(feats.shape[:-1] + (1,))], dim=-1)


@dataclass
class BatchState:
    """Everything a batch's closed-form gradients need: features, embeddings, norms, logits, softmaxes."""

    H: torch.Tensor  # (B, d_v') augmented image features
    T: torch.Tensor  # (B, d_t') augmented text features
    X: torch.Tensor  # (B, D) normalised image embeddings
    Y: torch.Tensor  # (B, D) normalised text embeddings
    nv: torch.Tensor  # (B,) |v_i|
    nw: torch.Tensor  # (B,) |w_i|
    s: torch.Tensor  # 0-dim e^θ
    S: torch.Tensor  # (B, B) logits
    P: torch.Tensor  # (B, B) row softmax, diagonal zeroed (off-diagonal mass only)
    Q: torch.Tensor  # (B, B) column softmax, diagonal zeroed
    P_diag: torch.Tensor  # (B,) P_ii
    Q_diag: torch.Tensor  # (B,) Q_ii
    p_off: torch.Tensor  # (B,) 1 − P_ii computed as Σ_{j≠i} P_ij
    q_off: torch.Tensor  # (B,) 1 − Q_ii computed as Σ_{a≠i} Q_ai


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"endpoint math runs in float32 or float64, got {x.dtype} (fp16 rounds 1 - p_corr to 0)"
        )


def embed(h: torch.Tensor, t: torch.Tensor, params: EndpointParams) -> tuple[torch.Tensor, ...]:
    """Augmented features, normalised embeddings and norms: (H, T, X, Y, |v|, |w|)."""
    _check_dtype(params.W_v)
    H = augment(h.to(params.W_v.dtype), params.v_bias)
    T = augment(t.to(params.W_t.dtype), params.t_bias)
    if H.shape[1] != params.W_v.shape[1] or T.shape[1] != params.W_t.shape[1]:
        raise ValueError(
            f"features (d_v={h.shape[1]}, d_t={t.shape[1]}) do not match the endpoint "
            f"(d_v={params.d_v}, d_t={params.d_t})"
        )
    v = H @ params.W_v.T
    w = T @ params.W_t.T
    nv = v.norm(dim=1)
    nw = w.norm(dim=1)
    return H, T, v / nv[:, None], w / nw[:, None], nv, nw


def batch_state(h: torch.Tensor, t: torch.Tensor, params: EndpointParams) -> BatchState:
    """Forward pass of one batch with softmaxes in log space."""
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"h has {h.shape[0]} rows but t has {t.shape[0]}")
    if h.shape[0] < 2:
        raise ValueError("a batch needs at least 2 pairs (a batch of one has zero InfoNCE gradient)")
    H, T, X, Y, nv, nw = embed(h, t, params)
    s = params.logit_scale.reshape(()).exp()
    S = s * (X @ Y.T)
    eye = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    P = torch.log_softmax(S, dim=1).exp()
    Q = torch.log_softmax(S, dim=0).exp()
    P_diag, Q_diag = P.diagonal().clone(), Q.diagonal().clone()
    P = P.masked_fill(eye, 0.0)
    Q = Q.masked_fill(eye, 0.0)
    return BatchState(H, T, X, Y, nv, nw, s, S, P, Q, P_diag, Q_diag, P.sum(1), Q.sum(0))


def per_sample_losses(h: torch.Tensor, t: torch.Tensor, params: EndpointParams) -> torch.Tensor:
    """(B,) symmetric InfoNCE ℓ_i = ½[−S_ii + LSE_j S_ij] + ½[−S_ii + LSE_a S_ai], differentiable.

    Written as ½ softplus(LSE_{j≠i}(S_ij − S_ii)) + ½ softplus(LSE_{a≠i}(S_ai − S_ii)): the same value, but
    autograd then never forms P_ii − 1, which rounds to 0 on confident pairs.
    """
    _, _, X, Y, _, _ = embed(h, t, params)
    S = params.logit_scale.reshape(()).exp() * (X @ Y.T)
    d = S.diagonal()
    eye = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    row = torch.logsumexp((S - d[:, None]).masked_fill(eye, float("-inf")), dim=1)
    col = torch.logsumexp((S - d[None, :]).masked_fill(eye, float("-inf")), dim=0)
    return 0.5 * torch.nn.functional.softplus(row) + 0.5 * torch.nn.functional.softplus(col)


def _self_terms(st: BatchState) -> tuple[torch.Tensor, torch.Tensor]:
    """r_i (B, D) and q_i (B, D) of METHOD.md §2 (the rank-one 'self' parts of each block)."""
    X, Y = st.X, st.Y
    rho = (
        0.5 * (st.P @ Y) - (0.5 * (st.p_off + st.q_off))[:, None] * Y
    )  # ½Σ_{b≠i}P_ib(y_b−y_i) − ½(1−Q_ii)y_i
    r = (rho - X * (X * rho).sum(1, keepdim=True)) / st.nv[:, None]
    sig = 0.5 * (st.Q.T @ X) - (0.5 * (st.q_off + st.p_off))[:, None] * X
    q = (sig - Y * (Y * sig).sum(1, keepdim=True)) / st.nw[:, None]
    return r, q


def theta_grads(st: BatchState) -> torch.Tensor:
    """(B,) ∂ℓ_i/∂θ = ½Σ_{b≠i}P_ib(S_ib − S_ii) + ½Σ_{a≠i}Q_ai(S_ai − S_ii)."""
    d = st.S.diagonal()
    return 0.5 * (st.P * (st.S - d[:, None])).sum(1) + 0.5 * (st.Q * (st.S - d[None, :])).sum(0)


def per_sample_grads(
    h: torch.Tensor, t: torch.Tensor, params: EndpointParams, negatives: str = "all"
) -> EndpointGrads:
    """Closed-form ∇_ϑ ℓ_i for every pair of one batch; 'all' in-batch negatives or 'self' only.

    Memory is B·p, so this full-space form is for tests, exact mode and small dims; the sketches
    compute Π·g without forming it.
    """
    return grads_from_state(batch_state(h, t, params), negatives)


def grads_from_state(st: BatchState, negatives: str = "all") -> EndpointGrads:
    """`per_sample_grads` for an already computed batch state."""
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    r, q = _self_terms(st)
    G_v = r[:, :, None] * st.H[:, None, :]
    G_t = q[:, :, None] * st.T[:, None, :]
    if negatives == "all":
        # ½ Σ_{a≠i} Q_ai (Π_a y_i / |v_a|) h_aᵀ  with Π_a y_i = y_i − x_a (x_a·y_i)
        c = 0.5 * st.Q / st.nv[:, None]  # c_ai
        G_v = G_v + st.Y[:, :, None] * (c.T @ st.H)[:, None, :]
        G_v = G_v - torch.einsum("ai,ad,ae->ide", c * (st.X @ st.Y.T), st.X, st.H)
        # ½ Σ_{b≠i} P_ib (Π'_b x_i / |w_b|) t_bᵀ  with Π'_b x_i = x_i − y_b (y_b·x_i)
        e = 0.5 * st.P / st.nw[None, :]  # e_ib
        G_t = G_t + st.X[:, :, None] * (e @ st.T)[:, None, :]
        G_t = G_t - torch.einsum("ib,bd,be->ide", e * (st.X @ st.Y.T), st.Y, st.T)
    return EndpointGrads(st.s * G_v, st.s * G_t, theta_grads(st))


def batch_grad_sum(h: torch.Tensor, t: torch.Tensor, params: EndpointParams) -> EndpointGrads:
    """Σ_i ∇_ϑ ℓ_i over one batch (B = 1 in the result), in O(B² D + B D d) without per-sample tensors.

    The sum of the coefficient matrices of all g_i is C = ½P + ½Q − I over the logits, so the batch sum
    is Σ_ab C_ab ∇S_ab; its diagonal is written as −½(Σ_{j≠i}P_ij + Σ_{a≠i}Q_ai) for stability.
    """
    st = batch_state(h, t, params)
    kappa = 0.5 * (st.p_off + st.q_off)
    C = 0.5 * (st.P + st.Q)  # off-diagonal part; diagonal is −kappa
    CY = C @ st.Y - kappa[:, None] * st.Y  # Σ_b C_ab y_b, row a
    R = (CY - st.X * (st.X * CY).sum(1, keepdim=True)) / st.nv[:, None]
    CtX = C.T @ st.X - kappa[:, None] * st.X  # Σ_a C_ab x_a, row b
    Rt = (CtX - st.Y * (st.Y * CtX).sum(1, keepdim=True)) / st.nw[:, None]
    return EndpointGrads((st.s * R.T @ st.H)[None], (st.s * Rt.T @ st.T)[None], theta_grads(st).sum()[None])


def zeroshot_losses(
    h: torch.Tensor, labels: torch.Tensor, class_t: torch.Tensor, params: EndpointParams
) -> torch.Tensor:
    """(N,) zero-shot cross-entropy of each image over the class-prompt embeddings (the definition)."""
    H, T, X, Y, _, _ = embed(h, class_t, params)
    S = params.logit_scale.reshape(()).exp() * (X @ Y.T)
    onehot = torch.nn.functional.one_hot(labels.reshape(-1).long(), Y.shape[0]).to(torch.bool)
    off = (S - S.gather(1, labels.reshape(-1, 1).long())).masked_fill(onehot, float("-inf"))
    return torch.nn.functional.softplus(torch.logsumexp(off, dim=1))


def zeroshot_grad_sum(
    h: torch.Tensor, labels: torch.Tensor, class_t: torch.Tensor, params: EndpointParams
) -> EndpointGrads:
    """Σ_e ∇_ϑ ℓ_e of the zero-shot loss ([resolved] for label-only eval sets, METHOD.md §3).

    ℓ_e = −S_{e,c_e} + LSE_c S_ec with S_ec = e^θ x_e·y_c; coefficients (P_ec − δ_{c,c_e}) over the logits.
    """
    H, T, X, Y, nv, nw = embed(h, class_t, params)
    labels = labels.reshape(-1).long()
    n_cls = Y.shape[0]
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_cls):
        raise ValueError(f"labels must lie in [0, {n_cls}), got range [{labels.min()}, {labels.max()}]")
    s = params.logit_scale.reshape(()).exp()
    S = s * (X @ Y.T)
    onehot = torch.nn.functional.one_hot(labels, n_cls).to(torch.bool)
    P = torch.log_softmax(S, dim=1).exp().masked_fill(onehot, 0.0)
    C = P - P.sum(1, keepdim=True) * onehot.to(P.dtype)  # diagonal-of-label written as −Σ_{c≠c_e} P_ec
    CY = C @ Y
    R = (CY - X * (X * CY).sum(1, keepdim=True)) / nv[:, None]
    CtX = C.T @ X
    Rt = (CtX - Y * (Y * CtX).sum(1, keepdim=True)) / nw[:, None]
    g_theta = (C * S).sum()
    return EndpointGrads((s * R.T @ H)[None], (s * Rt.T @ T)[None], g_theta[None])


def logit_grads(st: BatchState, a: torch.Tensor, b: torch.Tensor) -> EndpointGrads:
    """Full-space ∇_ϑ S_ab for index pairs (a[n], b[n]) of one batch: the rank-one blocks of METHOD.md §2."""
    X, Y = st.X, st.Y
    xy = (X[a] * Y[b]).sum(1, keepdim=True)
    u = (Y[b] - X[a] * xy) / st.nv[a, None]  # Π_a y_b / |v_a|
    w = (X[a] - Y[b] * xy) / st.nw[b, None]  # Π'_b x_a / |w_b|
    G_v = st.s * u[:, :, None] * st.H[a][:, None, :]
    G_t = st.s * w[:, :, None] * st.T[b][:, None, :]
    return EndpointGrads(G_v, G_t, st.S[a, b])


def weighted_logit_sum(st: BatchState, W: torch.Tensor, dim: int) -> EndpointGrads:
    """Full-space Σ_j W_ij ∇S_ij per row i (dim=1) or Σ_a W_ai ∇S_ai per column i (dim=0), (B, ...) each.

    One of the two blocks is rank one per i; the other is a B×B contraction (memory B·p, not B²·p).
    """
    XY = st.X @ st.Y.T
    if dim == 1:
        WY = W @ st.Y
        r = (WY - st.X * (st.X * WY).sum(1, keepdim=True)) / st.nv[:, None]
        G_v = r[:, :, None] * st.H[:, None, :]
        c = W / st.nw[None, :]  # Σ_j c_ij (x_i − y_j (x_i·y_j)) t_jᵀ
        G_t = st.X[:, :, None] * (c @ st.T)[:, None, :] - torch.einsum("ij,jd,je->ide", c * XY, st.Y, st.T)
        return EndpointGrads(st.s * G_v, st.s * G_t, (W * st.S).sum(1))
    if dim == 0:
        c = W / st.nv[:, None]  # Σ_a c_ai (y_i − x_a (x_a·y_i)) h_aᵀ
        G_v = st.Y[:, :, None] * (c.T @ st.H)[:, None, :] - torch.einsum("ai,ad,ae->ide", c * XY, st.X, st.H)
        WX = W.T @ st.X
        q = (WX - st.Y * (st.Y * WX).sum(1, keepdim=True)) / st.nw[:, None]
        G_t = q[:, :, None] * st.T[:, None, :]
        return EndpointGrads(st.s * G_v, st.s * G_t, (W * st.S).sum(0))
    raise ValueError(f"dim must be 0 or 1, got {dim}")


def logit_directional(st: BatchState, V: EndpointGrads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, B) directional derivatives ∇S_ab·V split into W_v, W_t and θ parts (V: one full-space vector)."""
    XY = st.X @ st.Y.T
    VH = st.H @ V.G_v[0].T  # row a: V_v h_a
    VT = st.T @ V.G_t[0].T  # row b: V_t t_b
    dv = st.s * (VH @ st.Y.T - XY * (st.X * VH).sum(1)[:, None]) / st.nv[:, None]
    dt = st.s * (st.X @ VT.T - XY * (st.Y * VT).sum(1)[None, :]) / st.nw[None, :]
    return dv, dt, st.S * V.g_theta[0]


def logit_combination(st: BatchState, Gamma: torch.Tensor) -> EndpointGrads:
    """Σ_ab Γ_ab ∇_ϑ S_ab as one full-space vector, in O(B²D + BDd) from the rank-one blocks."""
    GY = Gamma @ st.Y
    R = (GY - st.X * (st.X * GY).sum(1, keepdim=True)) / st.nv[:, None]
    GX = Gamma.T @ st.X
    Rt = (GX - st.Y * (st.Y * GX).sum(1, keepdim=True)) / st.nw[:, None]
    return EndpointGrads((st.s * R.T @ st.H)[None], (st.s * Rt.T @ st.T)[None], (Gamma * st.S).sum()[None])
