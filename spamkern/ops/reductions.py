"""Whole-tensor reductions that the hyperparameter iteration runs at every evaluation.

Both are single vectorised passes standing in for slower exact forms: a finite check by
one sum instead of an entry-wise mask (400 µs against 10 µs for 2·10⁵ float32 entries on
one CPU core), and a float64 total from float32 partial sums instead of casting every
entry (a tenth of the cost).
"""

from __future__ import annotations

import torch

# entries per float32 partial sum of :func:`float64_sum`
_RUN = 1024


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite. A finite sum proves it (any NaN or ±Inf makes the sum
    non-finite); only a non-finite sum — or one that overflowed — needs the entry-wise
    check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def float64_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ x as a 0-d float64 tensor, for sums of ~10⁵ terms that cancel against others (the
    log det of a posterior and of its prior, each ~P·log δ).

    Runs of ``_RUN`` consecutive entries are summed in ``x``'s dtype (pairwise inside
    torch's kernel: relative error ~eps·log₂(_RUN) per run), the run totals in float64.
    For float32 terms of size ~10 that is ~10⁻⁴ absolute over 2·10⁵ entries, where a plain
    float32 total scatters by ~0.1. Float64 input, or less than one run, is summed in float64
    directly."""
    if x.dtype == torch.float64 or x.numel() < _RUN:  # less than a run: cast while summing
        return x.sum(dtype=torch.float64)
    flat = x.reshape(-1)
    cut = flat.numel() - flat.numel() % _RUN
    head = flat[:cut].view(-1, _RUN).sum(-1).sum(dtype=torch.float64)
    return head + flat[cut:].sum(dtype=torch.float64)
