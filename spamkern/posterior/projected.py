"""One block's share of a parameterwise evidence evaluation in its Kronecker eigenbasis.

With squared bases S1 = Q1∘Q1, S2 = Q2∘Q2 a per-entry prior D projects to
δ̃ = S1ᵀ D S2, and the block's precision in the eigenbasis is c = s·λ1λ2ᵀ + δ̃. Besides
Σ log c and diag Π⁻¹ = S1 (1/c) S2ᵀ (the gradient), an evaluation can return what a
shift of log δ over a whole block, row or column does to the log det's curvature: a
shift t of row r moves δ̃_ab by S1[r,a]·(D S2)[r,b], so Σ_ab (∂δ̃_ab/∂t)² / c_ab² is

    rows_r = Σ_b (D S2)[r,b]² · (S1∘S1 · 1/c²)[r,b],
    cols_l = Σ_a (S1ᵀ D)[a,l]² · (1/c² · (S2∘S2)ᵀ)[a,l],

one product of the block's small side for the rows and one of its large side for the
columns. The hyperparameter update uses them to precondition (see
:mod:`spamkern.marglik.shift_preconditioner`): the entries of a row or column are coupled
through δ̃, and these are the directions where that coupling cancels most of their own
curvature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spamkern.ops.reductions import float64_sum


@dataclass
class ProjectedTerms:
    logdet: torch.Tensor  # Σ log c, summed in float64
    inverse: torch.Tensor  # diag Π⁻¹ in parameter space, shaped like δ
    shift_coupling: torch.Tensor  # Σ (δ̃/c)²: the same for a shift of the whole block
    row_coupling: torch.Tensor | None = None  # per row, when asked for
    col_coupling: torch.Tensor | None = None  # per column, when asked for


def projected_terms(
    s1: torch.Tensor,
    s2: torch.Tensor | None,
    products: torch.Tensor,
    delta: torch.Tensor,
    scale,
    rows: bool = False,
    cols: bool = False,
) -> ProjectedTerms:
    """The terms for squared bases ``s1`` (…, p, p), ``s2`` (…, q, q) or None (a bias:
    λ2 ≡ 1, Q2 = [1]), eigenvalue products λ1λ2ᵀ (…, p, q) and precisions ``delta``
    (…, p, q); leading dimensions are independent slices."""
    right = delta @ s2 if s2 is not None else delta  # D S2, reused by the row couplings
    projected = s1.mT @ right
    scale = torch.as_tensor(scale, dtype=projected.dtype, device=projected.device)
    c = torch.addcmul(projected, products, scale)
    reciprocal = c.reciprocal()
    inverse = s1 @ reciprocal
    if s2 is not None:
        inverse = inverse @ s2.mT
    ratio = projected.mul_(reciprocal).reshape(-1)  # δ̃/c (``projected`` is not needed again)
    terms = ProjectedTerms(float64_sum(c.log_()), inverse, torch.dot(ratio, ratio))
    if rows or cols:
        weight = reciprocal.square()
    if rows:
        terms.row_coupling = (right.square() * (s1.square() @ weight)).sum(-1)
    if cols:
        left = s1.mT @ delta
        spread = weight @ s2.square().mT if s2 is not None else weight
        terms.col_coupling = (left.square() * spread).sum(-2)
    return terms


def side_costs(p: int, q: int, slices: int = 1) -> tuple[int, int, int]:
    """Multiply-adds of (an evaluation, its row couplings, its column couplings) for one
    (p, q) block of ``slices`` slices."""
    small, large = slices * p * p * q, slices * p * q * q
    return 2 * (small + large), small, small + large
