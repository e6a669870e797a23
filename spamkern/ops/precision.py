"""Posterior precision diagonal and OPD scores — the one pass pruning needs.

diag Π = scale · diag(H) + δ exactly, for every prior; for a Kronecker block
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


def _check_kron_blocks(
    theta: torch.Tensor,
    diag_g: list[torch.Tensor],
    diag_a: list[torch.Tensor | None],
    prior_diag: torch.Tensor,
) -> None:
    if len(diag_g) != len(diag_a):
        raise ValueError(
            f"diag_g and diag_a must list the same blocks, got {len(diag_g)} and {len(diag_a)}"
        )
    if theta.ndim != 1 or theta.shape != prior_diag.shape:
        raise ValueError(
            "theta and prior_diag must be (P,) vectors of one length, got "
            f"{tuple(theta.shape)} and {tuple(prior_diag.shape)}"
        )
    for g, a in zip(diag_g, diag_a):
        if g.ndim != 1 or (a is not None and a.ndim != 1):
            raise ValueError("diag_g and diag_a entries must be 1-D factor diagonals (or None)")
    total = sum(g.numel() * (1 if a is None else a.numel()) for g, a in zip(diag_g, diag_a))
    if total != theta.numel():
        raise ValueError(
            f"the blocks cover {total} parameters but theta has {theta.numel()} entries"
        )


@register_impl("kron_precision_and_opd", "torch")
def kron_precision_and_opd_reference(
    theta: torch.Tensor,
    diag_g: list[torch.Tensor],
    diag_a: list[torch.Tensor | None],
    prior_diag: torch.Tensor,
    scale: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [g if a is None else torch.outer(g, a).reshape(-1) for g, a in zip(diag_g, diag_a)]
    return precision_and_opd_reference(theta, torch.cat(parts).to(theta.dtype), prior_diag, scale)


def kron_precision_and_opd(
    theta: torch.Tensor,
    diag_g: list[torch.Tensor],
    diag_a: list[torch.Tensor | None],
    prior_diag: torch.Tensor,
    scale: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag Π, OPD scores)`` straight from the Kronecker factors' diagonals.

    Block ``i`` covers ``len(diag_g[i]) · len(diag_a[i])`` consecutive entries of ``theta``
    (row-major diag(G) ⊗ diag(A)); ``diag_a[i] = None`` marks a bias or an exact diagonal
    block whose curvature is ``diag_g[i]`` itself. Never forms the (P,) curvature vector in
    the fused backends.
    """
    _check_kron_blocks(theta, list(diag_g), list(diag_a), prior_diag)
    impl = select_impl("kron_precision_and_opd", theta)
    return impl(theta, list(diag_g), list(diag_a), prior_diag, scale)
