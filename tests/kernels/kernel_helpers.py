"""Shared helpers of the kernel tests."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, computed in float64."""
    expected = expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-300)
    return float((actual.detach().double() - expected.detach()).abs().max() / scale)
