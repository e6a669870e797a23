"""``bsr_linear``: y = x Wᵀ + b for a block-sparse W, one entry point over every backend.

Backends (spamkern.dispatch, ``SPAMKERN_BACKEND``): ``torch`` (reference: the dense masked
weight through F.linear), ``cpp`` (spamkern._C, CPU; 16-bit inputs computed in float32),
``cuda`` (spamkern._C, tensor cores, fp16/bf16), ``triton`` (GPU, or CPU under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spamkern.dispatch import register_impl, select_impl
from spamkern.sparse.format import BlockSparseWeight


def _dense_from_parts(row_ptr, col_idx, blocks_t, out_features, in_features) -> torch.Tensor:
    _, bk, bn = blocks_t.shape
    nb = row_ptr.numel() - 1
    kb = -(-in_features // bk)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(nb, device=blocks_t.device), counts)
    tiles = blocks_t.new_zeros(nb, kb, bk, bn)
    tiles[rows, col_idx.long()] = blocks_t
    dense = tiles.permute(0, 3, 1, 2).reshape(nb * bn, kb * bk)
    return dense[:out_features, :in_features]


@register_impl("bsr_linear", "torch")
def bsr_linear_reference(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features):
    """Reference: rebuild the dense weight and call F.linear (any dtype, any device)."""
    w = _dense_from_parts(row_ptr, col_idx, blocks_t, out_features, x.shape[1])
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def bsr_linear(
    x: torch.Tensor,
    weight: BlockSparseWeight,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for x of shape (..., in_features); returns (..., out_features)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    args = (weight.row_ptr, weight.col_idx, weight.blocks_t, weight.row_order, bias, n)
    fn = select_impl("bsr_linear", x2, weight.blocks_t, backend=backend)
    return fn(x2, *args).reshape(*x.shape[:-1], n)
