"""Per-tensor posterior precision in an eigenbasis: log det and inverse, for every prior.

A block's precision Π = s·H + D (s = 1/T or 1/(Tσ²)) is written as

    Π ≈ W⁻¹ Q diag(denom) Qᵀ W⁻¹,   Q = Q1 ⊗ Q2,   W = diag(w)

so log det Π = Σ log denom − 2 Σ log w and Π⁻¹ = W Q diag(1/denom) Qᵀ W. The cases:

* exact diagonal block (any prior): Q = I, denom = s·h + δ, w = 1 (exact);
* Kronecker block, scalar/layerwise δ: denom = s·λ1 λ2ᵀ + δ (exact);
* Kronecker block, unitwise D = diag(e^a) ⊗ diag(e^b): whiten G̃ = D_a^{-½} G D_a^{-½},
  Ã = D_b^{-½} A D_b^{-½}; denom = s·λ̃1 λ̃2ᵀ + 1, w = e^{-(a_m+b_n)/2} (exact);
* Kronecker block, parameterwise D: δ̃ = (Q1∘Q1)ᵀ D (Q2∘Q2), denom = s·λ1 λ2ᵀ + δ̃. This
  keeps only the diagonal of QᵀDQ, so its log det is an upper bound on the exact one
  (Hadamard's inequality for the positive definite QᵀΠQ) and its inverse an approximation.

A bias block has the single factor G: the same with λ2 ≡ 1, Q2 = [1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spamkern.posterior.eigen import batched_eigh
from spamkern.prior.priors import TensorPrecision


@dataclass
class BlockEigen:
    """One tensor's precision in its eigenbasis (see module docstring)."""

    q1: torch.Tensor | None  # (p, p) or None for the identity
    q2: torch.Tensor | None  # (q, q) or None for the identity / a bias block
    denom: torch.Tensor  # (p, q)
    log_w: torch.Tensor | None  # (p, q) broadcastable, or None for w = 1

    def logdet(self) -> torch.Tensor:
        total = self.denom.log().sum()
        if self.log_w is not None:
            total = total - 2.0 * self.log_w.expand_as(self.denom).sum()
        return total

    def inverse_diag(self) -> torch.Tensor:
        """(p, q) diagonal of Π⁻¹ = W Q diag(1/denom) Qᵀ W: (Q1∘Q1)(1/denom)(Q2∘Q2)ᵀ ∘ w²."""
        out = self.denom.reciprocal()
        if self.q1 is not None:
            out = self.q1.square() @ out
        if self.q2 is not None:
            out = out @ self.q2.square().T
        if self.log_w is not None:
            out = out * (2.0 * self.log_w).exp()
        return out

    def quadratic(self, J: torch.Tensor) -> torch.Tensor:
        """(B, C, C) J Π⁻¹ Jᵀ for J of shape (B, C, p, q) (this block's Jacobian)."""
        if self.log_w is not None:
            J = J * self.log_w.exp()
        if self.q1 is not None:
            J = torch.einsum("mp,bcmq->bcpq", self.q1, J)
        if self.q2 is not None:
            J = torch.einsum("bcpn,nq->bcpq", J, self.q2)
        return torch.einsum("bcpq,bdpq->bcd", J / self.denom, J)


def weight_matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(out, in·kh·kw) view of a weight, (out, 1) of a bias or other tensor."""
    if len(shape) >= 2:
        return shape[0], int(torch.Size(shape[1:]).numel())
    return (int(torch.Size(shape).numel()), 1)


def unit_log_grid(tp: TensorPrecision, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log precisions of a unitwise weight, columns repeated over kernel
    positions (b_rep in SPEC §3)."""
    positions = int(torch.Size(shape[2:]).numel()) if len(shape) > 2 else 1
    return tp.a, tp.b.repeat_interleave(positions)


def whitened_unit_eigen(
    factors: list[torch.Tensor], tp: TensorPrecision, shape: torch.Size, scale
) -> BlockEigen:
    """Exact unitwise block through whitened factors (decomposed anew for each (a, b))."""
    G = factors[0]
    if len(factors) == 2:
        a, b_rep = unit_log_grid(tp, shape)
        A = factors[1]
        Gw = G * torch.exp(-0.5 * (a[:, None] + a[None, :]))
        Aw = A * torch.exp(-0.5 * (b_rep[:, None] + b_rep[None, :]))
        (l1, q1), (l2, q2) = _differentiable_eigh([Gw, Aw])
        denom = scale * torch.outer(l1, l2) + 1.0
        log_w = -0.5 * (a[:, None] + b_rep[None, :])
        return BlockEigen(q1, q2, denom, log_w)
    d = tp.expand(shape).reshape(-1)  # a 1-D tensor: one log precision per entry
    Gw = G * torch.exp(-0.5 * (d[:, None] + d[None, :]))
    ((l1, q1),) = _differentiable_eigh([Gw])
    return BlockEigen(q1, None, (scale * l1 + 1.0)[:, None], -0.5 * d[:, None])


def unitwise_logdet(
    blocks: list[tuple[list[torch.Tensor], TensorPrecision, torch.Size]], scale
) -> torch.Tensor:
    """Σ over unitwise Kronecker blocks of their exact log det, eigenvalues batched.

    Same value as ``whitened_unit_eigen(...).logdet()`` per block, but the whitened factors
    of equal size are decomposed in one stacked ``eigvalsh`` call per size (one solver
    launch per size on a GPU instead of two per layer) — this runs at every hyperstep.
    """
    mats: list[torch.Tensor] = []
    shift = None  # −2 Σ log w = Σ_mn (a_m + b_n) for weights, Σ d for 1-D tensors
    layout = []
    for factors, tp, shape in blocks:
        if len(factors) == 2:
            a, b_rep = unit_log_grid(tp, shape)
            mats.append(factors[0] * torch.exp(-0.5 * (a[:, None] + a[None, :])))
            mats.append(factors[1] * torch.exp(-0.5 * (b_rep[:, None] + b_rep[None, :])))
            term = a.sum() * b_rep.numel() + b_rep.sum() * a.numel()
            layout.append(2)
        else:
            d = tp.expand(shape).reshape(-1)
            mats.append(factors[0] * torch.exp(-0.5 * (d[:, None] + d[None, :])))
            term = d.sum()
            layout.append(1)
        shift = term if shift is None else shift + term
    values = _stacked_eigvalsh(mats)
    total, pos = shift, 0
    for n_factors in layout:
        l1 = values[pos]
        l2 = values[pos + 1] if n_factors == 2 else l1.new_ones(1)
        total = total + torch.log(scale * torch.outer(l1, l2) + 1.0).sum()
        pos += n_factors
    return total


def _stacked_eigvalsh(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Eigenvalues (clamped at 0) of symmetric matrices, one stacked call per size."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(m.shape[-1], []).append(i)
    for indices in groups.values():
        stack = torch.stack([mats[i] for i in indices])
        values = torch.linalg.eigvalsh(0.5 * (stack + stack.transpose(-1, -2)))
        for j, i in enumerate(indices):
            out[i] = values[j].clamp_min(0.0)
    return out  # type: ignore[return-value]


def _differentiable_eigh(mats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """eigh that keeps autograd (the whitened factors depend on the hyperparameters)."""
    out = []
    for m in mats:
        values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
        out.append((values.clamp_min(0.0), vectors))
    return out


class KronEigenCache:
    """Eigendecompositions of every Kronecker factor, computed once per fit, batched."""

    def __init__(self, factors: dict[int, list[torch.Tensor]], names: dict[int, str]):
        keys, mats, labels = [], [], []
        for index, facs in factors.items():
            for j, F in enumerate(facs):
                keys.append((index, j))
                mats.append(F)
                labels.append(f"{names[index]}[{'GA'[j]}]")
        decomposed = batched_eigh(mats, labels)
        self.values: dict[int, list[torch.Tensor]] = {}
        self.vectors: dict[int, list[torch.Tensor]] = {}
        for (index, _), (vals, vecs) in zip(keys, decomposed):
            self.values.setdefault(index, []).append(vals)
            self.vectors.setdefault(index, []).append(vecs)

    def eigenvalues(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.values[index]
        l2 = values[1] if len(values) == 2 else values[0].new_ones(1)
        return values[0], l2

    def projected_delta(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        """δ̃ = (Q1∘Q1)ᵀ D (Q2∘Q2) for a (p, q) precision matrix D (parameterwise)."""
        vectors = self.vectors[index]
        out = vectors[0].square().T @ delta
        if len(vectors) == 2:
            out = out @ vectors[1].square()
        return out

    def eigen(self, index: int, delta: torch.Tensor, scale) -> BlockEigen:
        """Scalar (0-d δ) or parameterwise ((p, q) D) block in the cached eigenbasis."""
        l1, l2 = self.eigenvalues(index)
        vectors = self.vectors[index]
        d = delta if delta.ndim == 0 else self.projected_delta(index, delta)
        q2 = vectors[1] if len(vectors) == 2 else None
        return BlockEigen(vectors[0], q2, scale * torch.outer(l1, l2) + d, None)
