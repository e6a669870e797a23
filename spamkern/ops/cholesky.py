"""The lower Cholesky factor of one small dense matrix, with LAPACK's ``info``.

The parameterwise update factorises a few dozen coupling matrices (256 × 256 on an MLP)
per SpaM run. ``torch.linalg.cholesky_ex`` spends about two thirds of its time on one
core outside the factorisation (a column-major copy and a strided ``tril_``); the C++
kernel (``spamkern._C``, registered as ``"cpp"``) calls LAPACK's potrf on the row-major
buffer directly. The torch reference is ``torch.linalg.cholesky_ex`` itself.
"""

from __future__ import annotations

import torch

from spamkern.dispatch import register_impl, select_impl


def cholesky_lower(
    matrix: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, info) with ``matrix`` = L Lᵀ, L lower triangular, for a symmetric (n, n) float32
    or float64 ``matrix``; ``info`` > 0 (an int32 0-d tensor) is the order of the first
    leading minor that is not positive definite, as torch.linalg.cholesky_ex reports it."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cholesky_lower needs one square matrix, got shape {tuple(matrix.shape)}")
    if matrix.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cholesky_lower takes float32 or float64, got {matrix.dtype}")
    return select_impl("cholesky_lower", matrix, backend=backend)(matrix)


@register_impl("cholesky_lower", "torch")
def cholesky_lower_reference(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    factor, info = torch.linalg.cholesky_ex(matrix)
    return factor, info
