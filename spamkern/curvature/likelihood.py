"""Likelihoods: the summed loss and the per-sample pseudo-gradients w.r.t. the outputs.

Every curvature type is Σ_n Σ_k J_nᵀ v_nk v_nkᵀ J_n for per-sample vectors v_nk over the
model outputs, so one backward of the (B, K, C) tensor ``V`` gives everything:

* exact GGN: the columns of a square root L of the loss Hessian w.r.t. the outputs; for
  softmax cross-entropy K = C − 1 of them, the Hessian's rank (:func:`softmax_hessian_root`),
  for the Gaussian likelihood L = I, K = C (the 1/σ² factor is applied later, as
  laplace-torch does);
* MC-GGN: one sampled label per sample, v = ∇_f ℓ(f, ŷ) with ŷ ~ p(y | f);
* EF: the per-sample loss gradient with the true label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIKELIHOODS = ("classification", "regression")
CURVATURES = ("ggn", "ggn-mc", "ef")


def check_likelihood(likelihood: str) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    return curvature


def check_targets(
    likelihood: str, f: torch.Tensor, y: torch.Tensor, check_range: bool = True
) -> None:
    """Refuse targets that do not fit the outputs (labels out of range, shape mismatch).

    ``check_range=False`` skips the label-range test (it syncs with the device) for labels
    already validated with :func:`check_label_range`.
    """
    if f.ndim != 2:
        raise ValueError(f"the model must return (batch, outputs) tensors, got {tuple(f.shape)}")
    if likelihood == "classification":
        if y.ndim != 1 or y.shape[0] != f.shape[0]:
            raise ValueError(
                f"classification targets must be a (batch,) vector of class indices, got shape "
                f"{tuple(y.shape)} for outputs {tuple(f.shape)}"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError(f"class labels must be an integer tensor, got {y.dtype}")
        if check_range:
            check_label_range(y, f.shape[1])
    elif y.shape != f.shape:
        raise ValueError(
            f"regression targets must have the outputs' shape {tuple(f.shape)}, "
            f"got {tuple(y.shape)}"
        )


def check_label_range(y: torch.Tensor, n_classes: int) -> None:
    """Class labels must lie in [0, n_classes)."""
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes - 1}] for a model with {n_classes} outputs; "
            f"got labels in [{lo}, {hi}]"
        )


def summed_loss(likelihood: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_n ℓ_n: cross-entropy, or ½ Σ (f − y)² (laplace-torch's convention, σ applied later)."""
    if likelihood == "classification":
        return F.cross_entropy(f, y, reduction="sum")
    return 0.5 * (f - y).square().sum()


def mean_loss(likelihood: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-batch training loss: mean cross-entropy, or mean ½‖f − y‖²."""
    return summed_loss(likelihood, f, y) / f.shape[0]


def _draw_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    """Random draws happen where the generator lives (a CPU generator with CUDA outputs is
    allowed); without one, on the outputs' device."""
    return generator.device if generator is not None else like.device


def _sample_labels(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One label per row of the probabilities ``p`` (B, C), by inverting the cumulative
    distribution at a uniform draw: P(label = k) = p_k, with a fraction of the cost of
    ``torch.multinomial`` for small C (one uniform per row, a cumulative sum, a search)."""
    device = _draw_device(generator, p)
    u = torch.rand((p.shape[0], 1), generator=generator, dtype=p.dtype, device=device)
    labels = torch.searchsorted(p.to(device).cumsum(-1), u, right=True).squeeze(1)
    # the cumulative sum may end a rounding below 1
    return labels.clamp_max_(p.shape[-1] - 1).to(p.device)


def pseudo_gradients(
    likelihood: str,
    curvature: str,
    f: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, K, C) vectors v_nk with Σ_k v_nk v_nkᵀ the curvature's per-sample output Hessian."""
    f = f.detach()
    n, c = f.shape
    if likelihood == "classification":
        p = torch.softmax(f, dim=-1)
        if curvature == "ggn":
            return softmax_hessian_root(p)
        labels = _sample_labels(p, generator) if curvature == "ggn-mc" else y
        # p − e_label, in place on the fresh softmax (no one-hot tensor)
        return p.scatter_add_(1, labels.reshape(n, 1), p.new_full((n, 1), -1.0)).unsqueeze(1)
    if curvature == "ggn":
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        return eye.expand(n, c, c)
    if curvature == "ggn-mc":
        device = _draw_device(generator, f)
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=device)
        return noise.to(f.device).unsqueeze(1)
    return (f - y).unsqueeze(1)


def softmax_hessian_root(p: torch.Tensor) -> torch.Tensor:
    """(B, C − 1, C) vectors v_k with Σ_k v_k v_kᵀ = diag(p) − p pᵀ exactly, for C ≥ 2
    (one zero vector for C = 1).

    The Hessian of softmax cross-entropy has rank C − 1 (its rows sum to zero), so C − 1
    vectors carry all of it, and the exact GGN's backward and its G rows shrink by a factor
    (C − 1)/C — half for two classes — against the C columns √p_k (e_k − p). Pivot on the
    last class c: the block of the other classes is D^½ (I − u uᵀ) D^½ with D = diag(p_<c),
    u = √p_<c and ‖u‖² = 1 − p_c, and (I − α u uᵀ)² = I − u uᵀ for α = 1 / (1 + √p_c), so
    D^½ (I − α u uᵀ) factors it; each vector's last entry, −√(p_k p_c), makes it sum to zero
    as the Hessian's columns do. Vector k = √p_k (e_k − α p_<c − √p_c e_c), bounded for every
    p (no division, no pivoting on small probabilities)."""
    c = p.shape[-1]
    if c == 1:  # one class: the Hessian is 0
        return torch.zeros_like(p).unsqueeze(1)
    head, last = p[:, : c - 1], p[:, c - 1 :]
    root_last = last.sqrt()
    others = torch.cat([head, torch.zeros_like(last)], dim=1)  # p with p_c set to 0
    eye = torch.eye(c - 1, c, dtype=p.dtype, device=p.device)
    v = eye - (1.0 / (1.0 + root_last)).unsqueeze(-1) * others.unsqueeze(1)
    v[:, :, c - 1] = -root_last  # eye and p_<c are 0 there
    return head.sqrt().unsqueeze(-1) * v
