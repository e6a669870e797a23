"""log det of Kronecker-factored posterior precisions in the factors' eigenbasis.

Every prior reduces, per parameter tensor, to Σ_{p,q} log(s·λ1_p·λ2_q + δ_pq) with the
eigenvalues of the factors fixed during the hypersteps and only δ (and s) changing:
scalar/layerwise δ is one number per block, parameterwise δ̃ = (Q1∘Q1)ᵀ D (Q2∘Q2) is a
(p, q) matrix (an upper bound on the exact log det), a bias block has λ2 ≡ 1 and an exact
diagonal block λ1 = h, λ2 ≡ 1. :class:`EigLogdetPlan` packs the eigenvalues once per fit so a
hyperstep is one call (one launch for the fast backends) instead of one per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from spamkern.dispatch import register_impl, select_impl


@register_impl("eig_logdet", "torch")
def eig_logdet_reference(
    l1: list[torch.Tensor],
    l2: list[torch.Tensor],
    delta: list[torch.Tensor],
    scale: torch.Tensor | float,
) -> torch.Tensor:
    total = l1[0].new_zeros(())
    for a, b, d in zip(l1, l2, delta, strict=True):
        total = total + torch.log(scale * torch.outer(a, b) + d).sum()
    return total


@register_impl("eig_logdet_plan", "torch")
def eig_logdet_plan_reference(
    l1: list[torch.Tensor], l2: list[torch.Tensor]
) -> Callable[[list[torch.Tensor], torch.Tensor | float], torch.Tensor]:
    """The reference has nothing to pack: it evaluates the blocks one by one."""
    return functools.partial(eig_logdet_reference, l1, l2)


class EigLogdetPlan:
    """Σ_i Σ_pq log(scale·l1_i[p]·l2_i[q] + delta_i[p, q]) over many blocks.

    ``l1``/``l2`` hold each block's (clamped, non-negative) eigenvalues; ``delta`` (given per
    call) holds for each block a tensor broadcastable to (len(l1_i), len(l2_i)). The result
    is differentiable w.r.t. ``delta`` and ``scale``.
    """

    def __init__(self, l1: list[torch.Tensor], l2: list[torch.Tensor]):
        if len(l1) != len(l2):
            raise ValueError(f"l1 and l2 must list the same blocks, got {len(l1)} and {len(l2)}")
        self.l1 = [x.detach() for x in l1]
        self.l2 = [x.detach() for x in l2]
        # the fast backends pack the eigenvalues here, once per fit
        self._impl = select_impl("eig_logdet_plan", *self.l1)(self.l1, self.l2)

    def __call__(self, delta: list[torch.Tensor], scale: torch.Tensor | float) -> torch.Tensor:
        if len(delta) != len(self.l1):
            raise ValueError(f"expected {len(self.l1)} delta blocks, got {len(delta)}")
        return self._impl(delta, scale)
