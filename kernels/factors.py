"""Kronecker-factor accumulation ``out += alpha · UᵀU`` in Triton, upper-triangle tiles only.

One kernel serves both factors of KFAC:

* ``gram``: ``U = x`` (rows, d), e.g. Linear inputs for A, or the C·B pseudo-gradient rows of
  exact GGN for G (all classes in one product);
* ``conv_patch_gram``: ``U`` = the unfolded patch matrix of a Conv2d input, (B·S, c·kh·kw),
  which is never formed: each program loads its patch tiles straight from ``x``, decomposing
  the row index into (n, oh, ow) and the column index into (c, kh, kw), with stride,
  padding and dilation applied as masks (implicit im2col).

Only tiles (i, j) with i ≤ j are computed; an off-diagonal tile is added to ``out`` at (i, j)
and, transposed, at (j, i), so ``out`` is a full symmetric matrix after every call. Products
accumulate in float32 (float64 for float64 inputs) whatever the operand type; float32
operands go through tensor cores as 3×TF32 (float32 accuracy, ~1e-6) on a GPU, or plain TF32
(~1e-3) when ``torch.backends.cuda.matmul.allow_tf32`` is set — see
:func:`kernels._util.dot_precision`. Long row ranges are split over several programs
per tile (split-K) that add into ``out`` atomically, so the summation order — and the last
bits of the result — can vary between GPU runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from spamkern.dispatch import register_impl

from ._util import (
    TORCH_TO_TL,
    accumulation_dtype,
    device_scalar,
    dot_precision,
    interpreting,
    sm_count,
)


@triton.jit
def _load_rows(x_ptr, rows, cols, row_mask, col_mask, s0, s1):
    """Tile U[rows, cols] of a 2-D ``x`` (features contiguous: threads run along cols)."""
    mask = row_mask[:, None] & col_mask[None, :]
    ptr = x_ptr + rows.to(tl.int64)[:, None] * s0 + (cols * s1)[None, :]
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _load_patches_t(
    x_ptr, rows, cols, row_mask, col_mask, s0, s1, s2, s3,
    OH, OW, H, W, KW, KHW, sh, sw, ph, pw, dh, dw,
):  # fmt: skip
    """Tile Uᵀ[cols, rows] of the implicit patch matrix of a 4-D ``x``.

    Transposed so that threads run along the rows: consecutive rows are consecutive output
    columns ``ow``, i.e. neighbouring input pixels — coalesced loads for stride-1 convs.
    Row (n, oh, ow) and column (c, kh, kw) are decomposed on 1-D vectors; only the
    additions and the bounds mask are 2-D.
    """
    n = rows // (OH * OW)
    s = rows % (OH * OW)
    oh = s // OW
    ow = s % OW
    ch = cols // KHW
    kk = cols % KHW
    kh = kk // KW
    kw = kk % KW
    ih = (kh * dh)[:, None] + (oh * sh - ph)[None, :]
    iw = (kw * dw)[:, None] + (ow * sw - pw)[None, :]
    mask = col_mask[:, None] & row_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptr = x_ptr + (ch * s1)[:, None] + n.to(tl.int64)[None, :] * s0 + ih * s2 + iw * s3
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _sym_gram_kernel(
    x_ptr, out_ptr, alpha_ptr, tile_i_ptr, tile_j_ptr,
    n_rows, d, rows_per_split, so0, so1,
    s0, s1, s2, s3, OH, OW, H, W, KW, KHW, sh, sw, ph, pw, dh, dw,
    CONV: tl.constexpr, ATOMIC: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    ti = tl.load(tile_i_ptr + pid)
    tj = tl.load(tile_j_ptr + pid)
    ci = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    mi = ci < d
    mj = cj < d
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    for k0 in range(row_start, row_end, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        mr = rows < row_end
        if CONV:
            a_t = _load_patches_t(
                x_ptr, rows, ci, mr, mi, s0, s1, s2, s3,
                OH, OW, H, W, KW, KHW, sh, sw, ph, pw, dh, dw,
            )  # fmt: skip
            b_t = _load_patches_t(
                x_ptr, rows, cj, mr, mj, s0, s1, s2, s3,
                OH, OW, H, W, KW, KHW, sh, sw, ph, pw, dh, dw,
            )  # fmt: skip
            acc = tl.dot(a_t, tl.trans(b_t), acc, input_precision=PRECISION, out_dtype=ACC)
        else:
            a = _load_rows(x_ptr, rows, ci, mr, mi, s0, s1)
            b = _load_rows(x_ptr, rows, cj, mr, mj, s0, s1)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * tl.load(alpha_ptr)
    mask = mi[:, None] & mj[None, :]
    p_ij = out_ptr + ci[:, None] * so0 + cj[None, :] * so1
    if ATOMIC:
        tl.atomic_add(p_ij, acc, mask=mask)
    else:
        tl.store(p_ij, tl.load(p_ij, mask=mask) + acc, mask=mask)
    if ti != tj:
        p_ji = out_ptr + cj[None, :] * so0 + ci[:, None] * so1
        if ATOMIC:
            tl.atomic_add(p_ji, acc, mask=mask)
        else:
            tl.store(p_ji, tl.load(p_ji, mask=mask) + acc, mask=mask)


_TILE_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _upper_tiles(n_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) indices of the tiles with i ≤ j, built once per size and device."""
    key = (n_tiles, device)
    if key not in _TILE_CACHE:
        i, j = torch.triu_indices(n_tiles, n_tiles)
        _TILE_CACHE[key] = (i.to(device, torch.int32), j.to(device, torch.int32))
    return _TILE_CACHE[key]


def _launch_config(n_rows: int, d: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_D, BLOCK_K, split, num_warps, num_stages) for an (n_rows, d) product."""
    if interpreting():
        # few large programs: the interpreter's cost is per program and per loop step
        block_d = min(256, max(16, triton.next_power_of_2(d)))
        return block_d, 256, 1, 4, 1
    if dtype == torch.float64:
        block_d, block_k = 64, 16
    else:
        block_d, block_k = (128, 32) if d > 64 else (64, 64)
    n_tiles = math.ceil(d / block_d)
    tiles = n_tiles * (n_tiles + 1) // 2
    max_split = max(1, n_rows // (4 * block_k))
    split = max(1, min(max_split, math.ceil(2 * sm_count(device) / tiles)))
    return block_d, block_k, split, 8 if block_d == 128 else 4, 3


def _sym_gram_into(x: torch.Tensor, out: torch.Tensor, alpha: float, conv: tuple | None) -> None:
    """Launch the kernel: ``out += alpha · UᵀU``; ``conv`` = (kernel, stride, pad, dil) or None."""
    if x.dtype not in TORCH_TO_TL:
        raise TypeError(f"factor inputs must be float16/bfloat16/float32/float64, got {x.dtype}")
    acc_dtype = accumulation_dtype(x.dtype)
    if out.dtype != acc_dtype:
        raise TypeError(f"out must be {acc_dtype} for {x.dtype} inputs, got {out.dtype}")
    if conv is None:
        n_rows, d = x.shape
        strides = (x.stride(0), x.stride(1), 0, 0)
        geometry = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1)
    else:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv
        b, c, h, w = x.shape
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(f"convolution of a {h}x{w} input has no output positions")
        n_rows, d = b * oh * ow, c * kh * kw
        strides = tuple(x.stride())
        geometry = (oh, ow, h, w, kw, kh * kw, sh, sw, ph, pw, dh, dw)
    if out.shape != (d, d):
        raise ValueError(f"out must have shape ({d}, {d}), got {tuple(out.shape)}")
    if n_rows == 0 or d == 0:
        return
    block_d, block_k, split, num_warps, num_stages = _launch_config(n_rows, d, x.dtype, x.device)
    tile_i, tile_j = _upper_tiles(math.ceil(d / block_d), x.device)
    rows_per_split = math.ceil(math.ceil(n_rows / split) / block_k) * block_k
    split = math.ceil(n_rows / rows_per_split)
    grid = (tile_i.numel(), split)
    _sym_gram_kernel[grid](
        x, out, device_scalar(alpha, acc_dtype, x.device), tile_i, tile_j,
        n_rows, d, rows_per_split, out.stride(0), out.stride(1),
        *strides, *geometry,
        CONV=conv is not None, ATOMIC=split > 1, ACC=TORCH_TO_TL[acc_dtype],
        PRECISION=dot_precision(x.dtype), BLOCK_D=block_d, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


@torch.library.custom_op("spamkern::triton_gram_", mutates_args=("out",))
def triton_gram_(x: torch.Tensor, out: torch.Tensor, alpha: float) -> None:
    """``out += alpha · xᵀx`` (symmetric, upper tiles computed, mirrored in-kernel)."""
    _sym_gram_into(x, out, alpha, None)


@triton_gram_.register_fake
def _(x, out, alpha):
    return None


@torch.library.custom_op("spamkern::triton_conv_patch_gram_", mutates_args=("out",))
def triton_conv_patch_gram_(
    x: torch.Tensor,
    out: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    alpha: float,
) -> None:
    """``out += alpha · UᵀU`` for the implicit patch matrix ``U`` of a Conv2d input."""
    conv = tuple(tuple(int(v) for v in p) for p in (kernel_size, stride, padding, dilation))
    _sym_gram_into(x, out, alpha, conv)


@triton_conv_patch_gram_.register_fake
def _(x, out, kernel_size, stride, padding, dilation, alpha):
    return None


def _accumulate(out: torch.Tensor | None, x: torch.Tensor, d: int, launch) -> torch.Tensor:
    """Run ``launch(target)`` into ``out`` (or a fresh matrix), converting dtype if needed."""
    acc_dtype = accumulation_dtype(x.dtype)
    if out is None:
        target = torch.zeros(d, d, dtype=acc_dtype, device=x.device)
        launch(target)
        return target
    if out.dtype == acc_dtype and out.device == x.device:
        launch(out)
        return out
    target = torch.zeros(d, d, dtype=acc_dtype, device=x.device)
    launch(target)
    return out.add_(target.to(out.dtype))


def _supported(x: torch.Tensor, *args) -> bool:
    return x.dtype in TORCH_TO_TL


@register_impl("gram", "triton", supports=_supported)
def gram_triton(x: torch.Tensor, out: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Triton ``out += alpha · xᵀx``; a new matrix is float32 (float64 for float64 x)."""
    if torch.compiler.is_compiling():
        return _accumulate(out, x, x.shape[1], lambda t: triton_gram_(x, t, float(alpha)))
    # eager: launch directly, a custom-op call costs tens of µs of Python per batch and layer
    return _accumulate(out, x, x.shape[1], lambda t: _sym_gram_into(x, t, float(alpha), None))


@register_impl("conv_patch_gram", "triton", supports=_supported)
def conv_patch_gram_triton(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    """Triton implicit-im2col ``out += alpha · UᵀU`` (U never materialised)."""
    d = x.shape[1] * kernel_size[0] * kernel_size[1]
    geometry = [list(kernel_size), list(stride), list(padding), list(dilation)]
    if torch.compiler.is_compiling():
        return _accumulate(
            out, x, d, lambda t: triton_conv_patch_gram_(x, t, *geometry, float(alpha))
        )
    conv = tuple(tuple(int(v) for v in p) for p in geometry)
    return _accumulate(out, x, d, lambda t: _sym_gram_into(x, t, float(alpha), conv))
