"""Device-side order statistics for pruning thresholds (no sort, no copy to the host)."""

from __future__ import annotations

import torch

from spamkern.dispatch import register_impl, select_impl


@register_impl("kth_smallest", "torch")
def kth_smallest_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(scores, k).values


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat score vector, as a 0-d device tensor."""
    if scores.ndim != 1:
        raise ValueError(f"kth_smallest expects a flat (P,) vector, got {tuple(scores.shape)}")
    if not 1 <= k <= scores.numel():
        raise ValueError(f"k must lie in [1, {scores.numel()}], got {k}")
    return select_impl("kth_smallest", scores)(scores, k)
