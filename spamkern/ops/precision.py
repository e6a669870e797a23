"""Posterior precision diagonal and OPD scores — the one pass pruning needs.

diag Π = scale · diag(H) + δ exactly, for every prior (SPEC §4); for a Kronecker block
diag(G ⊗ A) = diag(G) ⊗ diag(A). OPD: s_i = ½ θ_i² Π_ii.
"""

from __future__ import annotations

import torch

from spamkern.dispatch import register_impl, select_impl


def kron_curvature_diag(factors: list[tuple[torch.Tensor, ...] | torch.Tensor]) -> torch.Tensor:
    """(P,) curvature diagonal from per-tensor blocks.

    Each block is ``(G, A)`` (weight: diag(G) ⊗ diag(A), row-major), ``(G,)`` (bias:
    diag(G)) or a tensor (an exact diagonal block, flattened as is).
    """
    parts = []
    for block in factors:
        if isinstance(block, torch.Tensor):
            parts.append(block.reshape(-1))
        elif len(block) == 2:
            parts.append(torch.outer(block[0].diagonal(), block[1].diagonal()).reshape(-1))
        elif len(block) == 1:
            parts.append(block[0].diagonal())
        else:
            raise ValueError(f"a curvature block has 1 or 2 factors, got {len(block)}")
    return torch.cat(parts)


@register_impl("precision_and_opd", "torch")
def precision_and_opd_reference(
    theta: torch.Tensor, curvature_diag: torch.Tensor, prior_diag: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    precision = curvature_diag * scale + prior_diag
    return precision, 0.5 * theta.square() * precision


def precision_and_opd(
    theta: torch.Tensor, curvature_diag: torch.Tensor, prior_diag: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag Π, OPD scores)`` for flat (P,) θ, curvature diagonal and prior diagonal.

    ``scale`` multiplies the curvature: 1/T for classification, 1/(T σ²) for regression.
    """
    if not theta.shape == curvature_diag.shape == prior_diag.shape:
        raise ValueError(
            "theta, curvature_diag and prior_diag must all be (P,) vectors of one length, got "
            f"{tuple(theta.shape)}, {tuple(curvature_diag.shape)}, {tuple(prior_diag.shape)}"
        )
    return select_impl("precision_and_opd", theta)(theta, curvature_diag, prior_diag, scale)
