"""A unitwise evidence evaluation in closed form: the log det ratio and its gradient.

With δ_mn = e^{a_m + b_n}, a Kronecker block's precision s·G⊗A + D_a⊗D_b whitens to
D^{½}(s·G̃⊗Ã + I)D^{½} (G̃ = D_a^{-½} G D_a^{-½}, Ã likewise), so its log det less the
prior's Σ(a_m + b_n) is exactly R = Σ_ij log(s·λ_i μ_j + 1) over the whitened eigenvalues:
the prior's terms cancel analytically, not in floating point. Whitening by u moves an
eigenvalue by ∂λ_i/∂u_m = −λ_i Q_mi² (first-order perturbation, exact also for repeated
eigenvalues since R is a spectral function), so

    ∂R/∂a = −(Q1∘Q1)(λ ∘ w),   w_i = Σ_j s·μ_j / (s·λ_i μ_j + 1),

and the same for b with the factors' roles swapped: two products with Q∘Q per block.

* A 1-D tensor (a bias, one precision e^{d_k} per entry): R = log det(s·G + diag e^d) − Σd
  by Cholesky, ∂R/∂d = e^d ∘ diag Π⁻¹ − 1; the whitened eigendecomposition where
  Cholesky fails.
* An exact diagonal block: R = Σ log(1 + s·h/δ), ∂R/∂log δ = −s·h / (s·h + δ).

The scatter Σ δθ² of a unitwise tensor is the bilinear form e^aᵀ Θ² e^b over its θ²
summed across kernel positions, and its per-hyperparameter sums are the two factors of
that form — no (rows × cols) grid of δ is built.

This replaces autograd's forward and backward through the log det at every evaluation of
the fixed-point update (where it was most of the time not spent in ``eigh``); the
gradients are mapped back onto the prior's flat layout by one backward over the small
graph that slices the hyperparameters into whitening vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from spamkern.ops.reductions import float64_sum
from spamkern.posterior.blocks import (
    WhitenedDecomposition,
    whitened_decompositions,
    whitening_vectors,
)
from spamkern.prior.priors import Prior


class UnitwiseRatio(NamedTuple):
    """Σ over blocks of log det Π_b − Σ log δ (float64, 0-d) and its gradient w.r.t. the
    prior's flat log precisions."""

    value: torch.Tensor
    grad: torch.Tensor


def kron_ratio(first: WhitenedDecomposition, second: WhitenedDecomposition, scale: torch.Tensor):
    """(R, ∂R/∂u1, ∂R/∂u2) of a whitened Kronecker block, u1 and u2 its two whitenings."""
    l1, l2 = first.values, second.values
    denom = torch.outer(scale * l1, l2).add_(1.0)
    reciprocal = denom.reciprocal()
    w1, w2 = reciprocal @ (scale * l2), (scale * l1) @ reciprocal
    value = float64_sum(denom.log_())
    return value, -(first.squared @ (l1 * w1)), -(second.squared @ (l2 * w2))


def vector_ratio(
    G: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    whitened: Callable[[], WhitenedDecomposition],
):
    """(R, ∂R/∂d) of a 1-D tensor with per-entry log precisions ``d``; ``whitened()``
    gives the eigendecomposition of G whitened by d, used where Cholesky fails (a
    precision singular to working precision)."""
    factor, info = torch.linalg.cholesky_ex(scale * G + torch.diag(d.exp()))
    if int(info) != 0:
        decomposition = whitened()
        scaled = scale * decomposition.values
        grad = -(decomposition.squared @ (scaled / (scaled + 1.0)))
        return float64_sum(torch.log1p(scaled)), grad
    f64 = torch.float64
    value = 2.0 * factor.diagonal().log().sum(dtype=f64) - d.sum(dtype=f64)
    return value, d.exp() * torch.cholesky_inverse(factor).diagonal() - 1.0


def diag_ratio(h: torch.Tensor, log_delta: torch.Tensor, scale: torch.Tensor):
    """(R, ∂R/∂log δ) of an exact diagonal block h with per-entry log precisions."""
    sh = scale * h
    delta = log_delta.exp()
    return float64_sum(torch.log1p(sh / delta)), -(sh / (sh + delta))


def unitwise_log_det_ratio(
    blocks: list, prior: Prior, log_precision: torch.Tensor, scale: torch.Tensor
) -> UnitwiseRatio:
    """:class:`UnitwiseRatio` of every curvature block of a unitwise posterior (the
    whitened decompositions from each block's cache where the whitening did not change)."""
    x = log_precision.detach().requires_grad_(True)
    with torch.enable_grad():  # only the slicing of x into whitening vectors is recorded
        diag, kron = [], []
        for block, slot, tp in zip(blocks, prior.slots, prior.per_tensor(x)):
            if block.uses_plan(prior.kind):  # an exact diagonal
                diag.append((block.h.reshape(slot.shape), tp.expand(slot.shape)))
            else:
                kron.extend(block.unitwise_parts(tp))
        logws = [whitening_vectors(factors, tp, shape) for factors, tp, shape, _ in kron]
    with torch.no_grad():
        terms = _kron_terms(kron, logws, scale)
        for h, log_delta in diag:
            value, grad = diag_ratio(h, log_delta.detach(), scale)
            terms.append((value, [log_delta], [grad]))
    outputs = [vector for _, vectors, _ in terms for vector in vectors]
    grads = [grad for _, _, part in terms for grad in part]
    (grad,) = torch.autograd.grad(outputs, x, grads)
    return UnitwiseRatio(torch.stack([value for value, _, _ in terms]).sum(), grad)


def _kron_terms(kron: list, logws: list, scale: torch.Tensor) -> list[tuple]:
    """(R, whitening vectors, ∂R per vector) of every Kronecker part: the two-factor ones
    from one batched set of decompositions, the 1-D ones (biases) by Cholesky."""
    pairs = [i for i, part in enumerate(kron) if len(part[0]) == 2]
    decomposed = whitened_decompositions([kron[i] for i in pairs], [logws[i] for i in pairs])
    terms = []
    for i, (first, second) in zip(pairs, decomposed):
        value, g1, g2 = kron_ratio(first, second, scale)
        terms.append((value, logws[i], [g1, g2]))
    for part, (d, *rest) in zip(kron, logws):
        if rest:
            continue

        def whitened(part=part, d=d) -> WhitenedDecomposition:
            return whitened_decompositions([part], [[d]])[0][0]

        value, grad = vector_ratio(part[0][0], d.detach(), scale, whitened)
        terms.append((value, [d], [grad]))
    return terms


def scatter_squares(prior: Prior, mean: torch.Tensor) -> list[torch.Tensor]:
    """Per tensor, θ² in float64: (rows, cols) summed over kernel positions for a unitwise
    tensor, flat otherwise — what :func:`unitwise_scatter` contracts with."""
    out, offset = [], 0
    for slot in prior.slots:
        n = max(1, int(torch.Size(slot.shape).numel()))
        squares = mean[offset : offset + n].to(torch.float64).square()
        offset += n
        if len(slot.shape) >= 2:
            squares = squares.reshape(slot.rows, slot.cols, slot.positions).sum(2)
        out.append(squares)
    return out


def unitwise_scatter(
    prior: Prior, log_precision: torch.Tensor, squares: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ δθ² in float64, its sum per hyperparameter in ``log_precision``'s layout) for a
    unitwise prior, with ``squares`` from :func:`scatter_squares`."""
    per_group = torch.zeros_like(log_precision)
    totals = []
    for slot, tp, th2 in zip(prior.slots, prior.per_tensor(log_precision), squares):
        if tp.kind == "unit":
            ea, eb = tp.a.to(th2.dtype).exp(), tp.b.to(th2.dtype).exp()
            rows, cols = th2 @ eb, ea @ th2
            per_group[slot.start : slot.start + slot.rows] = ea * rows
            per_group[slot.start + slot.rows : slot.stop] = eb * cols
            totals.append(torch.dot(ea, rows))
        else:
            part = tp.expand(slot.shape).reshape(-1).to(th2.dtype).exp() * th2
            per_group[slot.start : slot.stop] = part
            totals.append(part.sum())
    return torch.stack(totals).sum(), per_group
