"""Kronecker-factor accumulation: ``out += alpha · XᵀX`` for layer inputs and output gradients.

These are the products that dominate a KFAC fit. The references use one matmul; the Triton
versions (``kernels/factors.py``) compute the upper triangle only and, for convolutions,
form the unfolded patches tile by tile instead of materialising ``unfold(x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spamkern.dispatch import register_impl, select_backend, select_impl

Pair = tuple[int, int]


@register_impl("gram", "torch")
def gram_reference(x: torch.Tensor, out: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``out += alpha · xᵀx`` for ``x`` of shape (n, d); allocates ``out`` when None.

    16-bit inputs are multiplied in float32 (a new ``out`` is float32), as the kernels do.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if out is None:
        prod = x.T @ x
        return prod if alpha == 1.0 else prod.mul_(alpha)
    if out.dtype != x.dtype:  # e.g. a float64 accumulator of float32 rows
        return out.add_(x.T @ x, alpha=alpha)
    # in place: no (d, d) temporary per call (a quarter of the product's time on the CPU)
    return out.addmm_(x.T, x, alpha=alpha)


def gram(x: torch.Tensor, out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """Symmetric Gram accumulation ``out += alpha · xᵀx``; ``x`` is (n, d), ``out`` (d, d)."""
    if x.ndim != 2:
        raise ValueError(f"gram expects a 2-D (rows, features) tensor, got shape {tuple(x.shape)}")
    return select_impl("gram", x)(x, out, alpha)


def _panel_width(d: int) -> int:
    """About six column panels, at least 64 columns wide (narrower ones lose more to the
    matmul's per-call cost than the skipped lower blocks save)."""
    return max(64, -(-d // 6))


def gram_upper(x: torch.Tensor, out: torch.Tensor | None = None, alpha: float = 1.0):
    """``out += alpha · xᵀx`` on the upper triangle only (the strict lower triangle of
    ``out`` is left undefined until :func:`mirror_upper_`): column panel ``i`` adds
    ``x_iᵀ x[:, i:]`` in place, skipping the blocks below the diagonal — about 40 % fewer
    FLOPs than the full product for d = 256. Only the CPU reference runs by panels; other
    backends (Triton on a GPU) compute the whole product, which mirrors to itself."""
    if x.ndim != 2:
        raise ValueError(f"gram expects a 2-D (rows, features) tensor, got shape {tuple(x.shape)}")
    d = x.shape[1]
    width = _panel_width(d)
    if x.device.type != "cpu" or d <= width or x.dtype in (torch.float16, torch.bfloat16):
        return gram(x, out, alpha)
    if select_backend("gram", x) != "torch" or (out is not None and out.dtype != x.dtype):
        return gram(x, out, alpha)
    if out is None:
        out = x.new_zeros(d, d)
    for start in range(0, d, width):
        stop = start + width
        out[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:], alpha=alpha)
    return out


def mirror_upper_(m: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of (a stack of) square matrices onto the lower, in place.

    After ``triu_`` the strict lower triangle of the transposed view holds exactly the
    upper entries, so one copy of that triangle completes the matrix (a third less
    memory traffic than copying the strict upper triangle first)."""
    return m.triu_().add_(torch.tril(m.mT, -1))


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
