"""Block-sparse linear ``y = x Wᵀ + b`` in Triton, W in spamkern's BSR format.

Kernels over the same format (spamkern/sparse/format.py; blocks pre-transposed):

* ``_bsr_linear_kernel`` — one program per (tile of BLOCK_M rows of x, block-row of W): it
  walks the stored blocks of its block-row through ``row_ptr``/``col_idx``, multiplying an
  x tile (BLOCK_M, bk) by each block (bk, bn) into a float32 accumulator, and writes one
  (BLOCK_M, bn) tile of y. Block-rows run heaviest first (``row_order``), which balances the
  tail of the launch when rows hold different numbers of blocks.
* ``_bsr_linear_t_kernel`` — the same with the operands swapped, (y tile)ᵀ = W · (x tile)ᵀ,
  so that on Hopper the tensor-core instruction is wide along the rows of x.
* decode (few rows, m ≤ 64): one row tile gives too few programs to fill the GPU, so either
  the tiled kernel splits each block-row's columns over COL_SPLIT programs (one launch), or
  ``_bsr_linear_splitk_kernel`` splits each block-row's block list over SPLIT programs that
  add their partial tiles into a float32 buffer atomically (three launches: zero, add,
  cast). The tuner measures both.

The launch configuration (BLOCK_M, warps, stages, split) is measured per (shape, density,
dtype, card) and cached in a JSON file per card (:mod:`spamkern.sparse.tuning`); under
``TRITON_INTERPRET=1`` a fixed configuration with few, large programs is used. In the
interpreter bfloat16 arithmetic is wrong, so tiles are upcast to float32 there (loads and
stores keep the real dtype).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from spamkern.dispatch import register_impl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_ROWS = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _bsr_linear_kernel(
    x_ptr,
    blocks_ptr,
    row_ptr,
    col_idx,
    row_order,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    F32_PRECISION: tl.constexpr,
    COL_SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    brow = tl.load(row_order + tl.program_id(1) // COL_SPLIT)
    start = tl.load(row_ptr + brow).to(tl.int64)  # 64-bit block offsets below
    end = tl.load(row_ptr + brow + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # COL_SPLIT programs share a block-row, each owning BN / COL_SPLIT of its columns
    offs_n = (tl.program_id(1) % COL_SPLIT) * (BN // COL_SPLIT) + tl.arange(0, BN // COL_SPLIT)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m[:, None] < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_tile = offs_k[:, None] * BN + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BN // COL_SPLIT), dtype=tl.float32)
    for p in range(start, end):
        k = tl.load(col_idx + p) * BK + offs_k
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=m_ok, other=0.0)
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)
        wt = tl.load(blocks_ptr + p * (BK * BN) + w_tile)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=F32_PRECISION)
    cols = brow * BN + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok & (cols[None, :] < N))


@triton.jit
def _bsr_linear_t_kernel(
    x_ptr,
    blocks_ptr,
    row_ptr,
    col_idx,
    row_order,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    F32_PRECISION: tl.constexpr,
):
    """The tiled kernel with the operands swapped: (y tile)ᵀ = W block-row · (x tile)ᵀ.

    The product is then (bn, BLOCK_M) instead of (BLOCK_M, bn): with 64-wide blocks and
    BLOCK_M = 256, Hopper's warp-group MMA runs its wide-N shape (64×256) and reads each
    shared-memory operand fewer times per flop.
    """
    pid_m = tl.program_id(0)
    brow = tl.load(row_order + tl.program_id(1))
    start = tl.load(row_ptr + brow).to(tl.int64)  # 64-bit block offsets below
    end = tl.load(row_ptr + brow + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m[None, :] < M
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # (x tile)ᵀ: (BK, BLOCK_M)
    w_tile = offs_k[None, :] * BN + offs_n[:, None]  # W block: (BN, BK)
    acc = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
    for p in range(start, end):
        k = tl.load(col_idx + p) * BK + offs_k
        if EVEN_K:
            xt = tl.load(x_cols + k[:, None], mask=m_ok, other=0.0)
        else:
            xt = tl.load(x_cols + k[:, None], mask=m_ok & (k[:, None] < K), other=0.0)
        wt = tl.load(blocks_ptr + p * (BK * BN) + w_tile)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(wt, xt, acc, input_precision=F32_PRECISION)
    cols = brow * BN + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[:, None]
    y = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + cols[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok & (cols[:, None] < N))


@triton.jit
def _bsr_linear_splitk_kernel(
    x_ptr,
    blocks_ptr,
    row_ptr,
    col_idx,
    row_order,
    bias_ptr,
    y32_ptr,
    M,
    N,
    K,
    stride_xm,
    SPLIT: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    F32_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    brow = tl.load(row_order + tl.program_id(1))
    start = tl.load(row_ptr + brow).to(tl.int64)  # 64-bit block offsets below
    end = tl.load(row_ptr + brow + 1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m[:, None] < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_tile = offs_k[:, None] * BN + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for p in range(start + split, end, SPLIT):
        k = tl.load(col_idx + p) * BK + offs_k
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=m_ok, other=0.0)
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)
        wt = tl.load(blocks_ptr + p * (BK * BN) + w_tile)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=F32_PRECISION)
    cols = brow * BN + offs_n
    if HAS_BIAS:
        first = (split == 0).to(tl.float32)
        acc += first * tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = y32_ptr + offs_m[:, None] * N + cols[None, :]
    tl.atomic_add(y, acc, mask=m_ok & (cols[None, :] < N))


def default_config(m: int, device: torch.device) -> dict:
    """Launch configuration used when nothing was measured (and always in the interpreter)."""
    if _interpreting() or device.type != "cuda":
        # few, large programs: the interpreter runs programs one after another
        block_m = max(16, min(128, triton.next_power_of_2(max(1, m))))
        return {"kind": "tiled", "BLOCK_M": block_m, "num_warps": 4, "num_stages": 1}
    if m <= DECODE_MAX_ROWS:
        block_m = max(16, triton.next_power_of_2(m))
        return {"kind": "tiled", "BLOCK_M": block_m, "num_warps": 4, "num_stages": 3}
    return {"kind": "tiled", "BLOCK_M": 128, "num_warps": 4, "num_stages": 3}


def candidate_configs(m: int, bn: int, bk: int) -> list[dict]:
    """Configurations the tuner measures on a GPU for ``m`` rows and (bn, bk) blocks."""
    configs = []
    if m <= DECODE_MAX_ROWS:
        block_m = max(16, triton.next_power_of_2(m))
        for warps in (2, 4):
            for stages in (2, 3, 4):
                for col_split in (1, 2, 4):
                    if bn // col_split < 16:
                        continue
                    configs.append(
                        {
                            "kind": "tiled",
                            "BLOCK_M": block_m,
                            "COL_SPLIT": col_split,
                            "num_warps": warps,
                            "num_stages": stages,
                        }
                    )
            for split in (2, 4, 8):
                configs.append(
                    {
                        "kind": "splitk",
                        "BLOCK_M": block_m,
                        "SPLIT": split,
                        "num_warps": warps,
                        "num_stages": 3,
                    }
                )
        return configs
    for kind in ("tiled", "tiled_t"):
        for block_m in (64, 128, 256):
            if block_m * bn > 256 * 64:  # accumulator would spill
                continue
            for warps in (4, 8):
                for stages in (3, 4):
                    if block_m == 256 and warps == 4 and kind == "tiled":
                        continue  # (the swapped kernel may: one warp group, 64×256 MMA)
                    configs.append(
                        {"kind": kind, "BLOCK_M": block_m, "num_warps": warps, "num_stages": stages}
                    )
    return configs


def _f32_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def launch(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    blocks_t: torch.Tensor,
    row_order: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    config: dict,
) -> torch.Tensor:
    """Run one kernel with an explicit ``config`` (x is 2-D, unit stride along columns)."""
    if x.dtype not in SUPPORTED_DTYPES or blocks_t.dtype != x.dtype:
        raise TypeError(
            f"Triton bsr_linear needs x and blocks of one dtype among {SUPPORTED_DTYPES}, "
            f"got {x.dtype} and {blocks_t.dtype}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    _, bk, bn = blocks_t.shape
    n_rows = row_ptr.numel() - 1
    common = {
        "BN": bn,
        "BK": bk,
        "BLOCK_M": config["BLOCK_M"],
        "HAS_BIAS": bias is not None,
        "EVEN_K": k % bk == 0,
        "UPCAST": _interpreting() and x.dtype != torch.float32,
        "F32_PRECISION": _f32_precision(x.dtype),
        "num_warps": config["num_warps"],
        "num_stages": config["num_stages"],
    }
    bias_arg = bias if bias is not None else blocks_t
    if m == 0 or n_rows == 0:
        return torch.empty(m, out_features, device=x.device, dtype=x.dtype)
    if config["kind"] == "splitk":
        if m > config["BLOCK_M"]:
            raise ValueError(f"the split-K kernel takes at most BLOCK_M={config['BLOCK_M']} rows")
        y32 = torch.zeros(m, out_features, device=x.device, dtype=torch.float32)
        grid = (config["SPLIT"], n_rows)
        _bsr_linear_splitk_kernel[grid](
            x, blocks_t, row_ptr, col_idx, row_order, bias_arg, y32, m, out_features, k,
            x.stride(0), SPLIT=config["SPLIT"], **common,
        )  # fmt: skip
        return y32 if x.dtype == torch.float32 else y32.to(x.dtype)
    y = torch.empty(m, out_features, device=x.device, dtype=x.dtype)
    if config["kind"] == "tiled_t":
        grid = (triton.cdiv(m, config["BLOCK_M"]), n_rows)
        _bsr_linear_t_kernel[grid](
            x, blocks_t, row_ptr, col_idx, row_order, bias_arg, y, m, out_features, k,
            x.stride(0), y.stride(0), **common,
        )  # fmt: skip
        return y
    col_split = config.get("COL_SPLIT", 1)
    if bn % col_split or bn // col_split < 16:
        raise ValueError(f"COL_SPLIT={col_split} must leave ≥ 16 of the {bn} block columns")
    grid = (triton.cdiv(m, config["BLOCK_M"]), n_rows * col_split)
    _bsr_linear_kernel[grid](
        x, blocks_t, row_ptr, col_idx, row_order, bias_arg, y, m, out_features, k,
        x.stride(0), y.stride(0), COL_SPLIT=col_split, **common,
    )  # fmt: skip
    return y


def bsr_linear_triton(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    blocks_t: torch.Tensor,
    row_order: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """Triton block-sparse linear with the tuned (or default) configuration."""
    from spamkern.sparse.tuning import triton_config

    config = triton_config(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features)
    return launch(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features, config)


# A custom op so torch.compile treats the launch as one opaque call with a known output.
# (Defined once per process even if this file is imported under two module names.)
def _bsr_linear_triton_op(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    blocks_t: torch.Tensor,
    row_order: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    return bsr_linear_triton(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features)


def _bsr_linear_triton_fake(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features):
    return x.new_empty(x.shape[0], out_features)


if hasattr(torch.ops.spamkern, "bsr_linear_triton"):
    _bsr_linear_triton_op = torch.ops.spamkern.bsr_linear_triton
else:
    _bsr_linear_triton_op = torch.library.custom_op("spamkern::bsr_linear_triton", mutates_args=())(
        _bsr_linear_triton_op
    )
    _bsr_linear_triton_op.register_fake(_bsr_linear_triton_fake)


def _supports(x: torch.Tensor, blocks_t: torch.Tensor | None = None, *rest) -> bool:
    return x.dtype in SUPPORTED_DTYPES and (blocks_t is None or blocks_t.dtype == x.dtype)


@register_impl("bsr_linear", "triton", supports=_supports)
def bsr_linear_triton_impl(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features):
    # the custom-op wrapper costs tens of microseconds of Python per call (a decode-sized
    # kernel takes a few): eager calls launch directly, traced calls go through the op
    if torch.compiler.is_compiling():
        return _bsr_linear_triton_op(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features)
    return bsr_linear_triton(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features)
