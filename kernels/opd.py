"""Posterior precision diagonal and OPD scores in one pass over the parameters.

``precision_and_opd`` reads θ, the curvature diagonal and the prior diagonal once and writes
``diag Π = scale·h + δ`` and ``s = ½ θ² diag Π`` together. ``kron_precision_and_opd`` goes
one step further for KFAC posteriors: it reads the factor diagonals diag(G), diag(A) of every
block (a few thousand numbers) instead of a (P,) curvature vector, forming
``h = diag(G)[r] · diag(A)[c]`` in registers. All blocks are handled by one launch: each
program owns a chunk of one block, located through a small table built from the shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spamkern.dispatch import register_impl

from ._util import TORCH_TO_TL, device_scalar, interpreting


@triton.jit
def _precision_opd_kernel(
    theta_ptr, curv_ptr, prior_ptr, scale_ptr, prec_ptr, score_ptr, n, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    theta = tl.load(theta_ptr + offs, mask=mask)
    prec = tl.load(curv_ptr + offs, mask=mask) * tl.load(scale_ptr) + tl.load(
        prior_ptr + offs, mask=mask
    )
    tl.store(prec_ptr + offs, prec, mask=mask)
    tl.store(score_ptr + offs, 0.5 * theta * theta * prec, mask=mask)


@triton.jit
def _kron_precision_opd_kernel(
    theta_ptr, g_ptr, a_ptr, prior_ptr, scale_ptr, prec_ptr, score_ptr,
    prog_block_ptr, prog_start_ptr, blk_theta_ptr, blk_g_ptr, blk_a_ptr, blk_na_ptr, blk_size_ptr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    blk = tl.load(prog_block_ptr + pid)
    start = tl.load(prog_start_ptr + pid)
    base = tl.load(blk_theta_ptr + blk)
    n_a = tl.load(blk_na_ptr + blk)
    size = tl.load(blk_size_ptr + blk)
    local = start + tl.arange(0, BLOCK)
    mask = local < size
    row = local // n_a
    col = local % n_a
    g = tl.load(g_ptr + tl.load(blk_g_ptr + blk) + row, mask=mask, other=0.0)
    a = tl.load(a_ptr + tl.load(blk_a_ptr + blk) + col, mask=mask, other=0.0)
    offs = base + local
    theta = tl.load(theta_ptr + offs, mask=mask)
    prec = g * a * tl.load(scale_ptr) + tl.load(prior_ptr + offs, mask=mask)
    tl.store(prec_ptr + offs, prec, mask=mask)
    tl.store(score_ptr + offs, 0.5 * theta * theta * prec, mask=mask)


def _block_size() -> int:
    return 1 << 16 if interpreting() else 1024


def _check_float(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the Triton OPD pass takes float32/float64 tensors, got {t.dtype}")


def _precision_and_opd_launch(
    theta: torch.Tensor, curvature_diag: torch.Tensor, prior_diag: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: ``(scale·h + δ, ½ θ² (scale·h + δ))``."""
    theta, curv, prior = (t.contiguous() for t in (theta, curvature_diag, prior_diag))
    _check_float(theta, curv, prior)
    prec = torch.empty_like(theta)
    score = torch.empty_like(theta)
    if theta.numel():
        block = _block_size()
        _precision_opd_kernel[(triton.cdiv(theta.numel(), block),)](
            theta, curv.to(theta.dtype), prior.to(theta.dtype),
            scale.to(theta.dtype), prec, score, theta.numel(),
            BLOCK=block,
        )  # fmt: skip
    return prec, score


@torch.library.custom_op("spamkern::triton_precision_and_opd", mutates_args=())
def triton_precision_and_opd(
    theta: torch.Tensor, curvature_diag: torch.Tensor, prior_diag: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom-op form of the one-pass kernel (what ``torch.compile`` traces)."""
    return _precision_and_opd_launch(theta, curvature_diag, prior_diag, scale)


@triton_precision_and_opd.register_fake
def _(theta, curvature_diag, prior_diag, scale):
    return torch.empty_like(theta), torch.empty_like(theta)


_PLAN_CACHE: dict[tuple, tuple[int, list[torch.Tensor]]] = {}


def _kron_plan(g_sizes: tuple[int, ...], a_sizes: tuple[int, ...], device: torch.device):
    """(number of programs, device tables) for blocks of diag(G) ⊗ diag(A) sizes."""
    key = (g_sizes, a_sizes, device, _block_size())
    if key in _PLAN_CACHE:
        return _PLAN_CACHE[key]
    block = _block_size()
    prog_block, prog_start, blk_theta, blk_g, blk_a, blk_na, blk_size = ([] for _ in range(7))
    theta_off = g_off = a_off = 0
    ones_slot = sum(a for a in a_sizes if a > 0)  # a trailing 1.0 serves every bias block
    for i, (m, n) in enumerate(zip(g_sizes, a_sizes)):
        size = m * max(n, 1)
        blk_theta.append(theta_off)
        blk_g.append(g_off)
        blk_a.append(a_off if n > 0 else ones_slot)
        blk_na.append(max(n, 1))
        blk_size.append(size)
        for start in range(0, size, block):
            prog_block.append(i)
            prog_start.append(start)
        theta_off += size
        g_off += m
        a_off += max(n, 0)
    tables = [
        torch.tensor(v, dtype=torch.int64, device=device)
        for v in (prog_block, prog_start, blk_theta, blk_g, blk_a, blk_na, blk_size)
    ]
    if len(_PLAN_CACHE) > 64:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[key] = (len(prog_block), tables)
    return _PLAN_CACHE[key]


def _kron_precision_and_opd_launch(
    theta: torch.Tensor,
    diag_g: list[torch.Tensor],
    diag_a: list[torch.Tensor],
    prior_diag: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused KFAC pass; an empty ``diag_a[i]`` marks a bias/diagonal block (h = diag_g[i])."""
    theta, prior = theta.contiguous(), prior_diag.contiguous()
    _check_float(theta, prior)
    prec = torch.empty_like(theta)
    score = torch.empty_like(theta)
    if not diag_g or not theta.numel():
        return prec, score
    g_sizes = tuple(g.numel() for g in diag_g)
    a_sizes = tuple(a.numel() for a in diag_a)
    n_programs, tables = _kron_plan(g_sizes, a_sizes, theta.device)
    one = device_scalar(1.0, theta.dtype, theta.device)
    g = torch.cat([t.to(theta.dtype) for t in diag_g])
    a = torch.cat([t.to(theta.dtype) for t in diag_a if t.numel()] + [one])
    _kron_precision_opd_kernel[(n_programs,)](
        theta, g, a, prior.to(theta.dtype), scale.to(theta.dtype),
        prec, score, *tables, BLOCK=_block_size(),
    )  # fmt: skip
    return prec, score


@torch.library.custom_op("spamkern::triton_kron_precision_and_opd", mutates_args=())
def triton_kron_precision_and_opd(
    theta: torch.Tensor,
    diag_g: list[torch.Tensor],
    diag_a: list[torch.Tensor],
    prior_diag: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom-op form of the fused KFAC pass (what ``torch.compile`` traces)."""
    return _kron_precision_and_opd_launch(theta, diag_g, diag_a, prior_diag, scale)


@triton_kron_precision_and_opd.register_fake
def _(theta, diag_g, diag_a, prior_diag, scale):
    return torch.empty_like(theta), torch.empty_like(theta)


def _scale_tensor(scale: float | torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``scale`` as a (1,) device tensor (no host synchronisation for tensor scales)."""
    return device_scalar(scale, theta.dtype, theta.device)


def _supported(theta: torch.Tensor, *args) -> bool:
    return theta.dtype in (torch.float32, torch.float64) and theta.dtype in TORCH_TO_TL


@register_impl("precision_and_opd", "triton", supports=_supported)
def precision_and_opd_triton(
    theta: torch.Tensor,
    curvature_diag: torch.Tensor,
    prior_diag: torch.Tensor,
    scale: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    # eager calls skip the custom-op wrapper (tens of µs of Python per call)
    fn = triton_precision_and_opd if torch.compiler.is_compiling() else _precision_and_opd_launch
    return fn(theta, curvature_diag, prior_diag, _scale_tensor(scale, theta))


@register_impl("kron_precision_and_opd", "triton", supports=_supported)
def kron_precision_and_opd_triton(
    theta: torch.Tensor,
    diag_g: list[torch.Tensor],
    diag_a: list[torch.Tensor | None],
    prior_diag: torch.Tensor,
    scale: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    empty = theta.new_empty(0)
    a_list = [empty if a is None else a for a in diag_a]
    compiling = torch.compiler.is_compiling()
    fn = triton_kron_precision_and_opd if compiling else _kron_precision_and_opd_launch
    return fn(theta, list(diag_g), a_list, prior_diag, _scale_tensor(scale, theta))
