"""Kronecker-factor accumulation: ``out += alpha · XᵀX`` for layer inputs and output gradients.

These are the products that dominate a KFAC fit. The references use one matmul; the Triton
versions (``kernels/factors.py``) compute the upper triangle only and, for convolutions,
form the unfolded patches tile by tile instead of materialising ``unfold(x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spamkern.dispatch import register_impl, select_impl

Pair = tuple[int, int]


@register_impl("gram", "torch")
def gram_reference(x: torch.Tensor, out: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``out += alpha · xᵀx`` for ``x`` of shape (n, d); allocates ``out`` when None.

    16-bit inputs are multiplied in float32 (a new ``out`` is float32), as the kernels do.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    prod = x.T @ x
    if out is None:
        return prod.mul_(alpha)
    return out.add_(prod, alpha=alpha)


def gram(x: torch.Tensor, out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """Symmetric Gram accumulation ``out += alpha · xᵀx``; ``x`` is (n, d), ``out`` (d, d)."""
    if x.ndim != 2:
        raise ValueError(f"gram expects a 2-D (rows, features) tensor, got shape {tuple(x.shape)}")
    return select_impl("gram", x)(x, out, alpha)


def unfold_patches(
    x: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> torch.Tensor:
    """Conv2d input patches as rows: (B·S, c·kh·kw), S = number of output positions."""
    u = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


@register_impl("conv_patch_gram", "torch")
def conv_patch_gram_reference(
    x: torch.Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    out: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    """``out += alpha · Σ_{n,s} u_ns u_nsᵀ`` with ``u`` the unfolded patches of ``x``."""
    return gram_reference(unfold_patches(x, kernel_size, stride, padding, dilation), out, alpha)


def conv_patch_gram(
    x: torch.Tensor,
    kernel_size: Pair,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    out: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """KFAC input factor of a Conv2d (groups=1) from its input ``x`` (B, c, H, W).

    Returns ``out + alpha · UᵀU`` with ``U`` the (B·S, c·kh·kw) patch matrix, in the
    row-major (c, kh, kw) order of ``conv.weight.flatten(1)``.
    """
    if x.ndim != 4:
        raise ValueError(f"conv_patch_gram expects (B, C, H, W) input, got {tuple(x.shape)}")
    impl = select_impl("conv_patch_gram", x)
    return impl(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), out, alpha)
