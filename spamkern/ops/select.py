"""Device-side order statistics for pruning thresholds (no sort, no copy to the host)."""

from __future__ import annotations

import math

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


@register_impl("segment_kth_smallest", "torch")
def segment_kth_smallest_reference(
    scores: torch.Tensor, sizes: list[int], ks: list[int]
) -> torch.Tensor:
    out = scores.new_full((len(sizes),), float("-inf"))
    for i, (segment, k) in enumerate(zip(torch.split(scores, sizes), ks)):
        if k > 0:
            out[i] = torch.kthvalue(segment, k).values
    return out


def segment_kth_smallest(scores: torch.Tensor, sizes: list[int], ks: list[int]) -> torch.Tensor:
    """For consecutive segments of ``scores`` (lengths ``sizes``), the ``ks[i]``-th smallest.

    Returns an (S,) device tensor; ``ks[i] = 0`` gives ``-inf`` (nothing below it). All
    segments are selected together (a few launches in all, not per segment).
    """
    if scores.ndim != 1:
        raise ValueError(f"segment_kth_smallest expects a flat (P,) vector, got {scores.shape}")
    sizes, ks = [int(s) for s in sizes], [int(k) for k in ks]
    if len(sizes) != len(ks):
        raise ValueError(
            f"sizes and ks must have one entry per segment, got {len(sizes)}/{len(ks)}"
        )
    if sum(sizes) != scores.numel() or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive and sum to {scores.numel()}, got {sizes}")
    if any(not 0 <= k <= s for k, s in zip(ks, sizes)):
        raise ValueError(f"each k must lie in [0, segment size]; got ks={ks} for sizes={sizes}")
    return select_impl("segment_kth_smallest", scores)(scores, sizes, ks)


def threshold_for_sparsity(
    scores: torch.Tensor, sparsity: float, sizes: list[int] | None = None
) -> torch.Tensor:
    """Pruning threshold(s): the ⌊sparsity·n⌋-th smallest score, on the device.

    ``sizes=None`` gives one global threshold (0-d); otherwise one per segment (layerwise,
    shape (S,)). Pruning the entries ``<= threshold`` removes ⌊sparsity·n⌋ of them (more only
    on ties); ``-inf`` means prune nothing.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if sizes is None:
        n = scores.numel()
        return segment_kth_smallest(scores, [n], [_n_pruned(sparsity, n)])[0]
    return segment_kth_smallest(scores, sizes, [_n_pruned(sparsity, int(s)) for s in sizes])


def _n_pruned(sparsity: float, n: int) -> int:
    """⌊sparsity·n⌋, robust to 0.7·10 = 6.999…"""
    return min(n, math.floor(sparsity * n + 1e-6))
