"""Kronecker-factor accumulation: ``out += alpha · XᵀX`` for layer inputs and output gradients.

These are the products that dominate a KFAC fit. The reference uses one matmul, the CPU
path one triangle by column panels; the Triton version (``kernels/factors.py``) computes
the upper tiles only. A convolution's input factor has a module of its own
(:mod:`spamkern.ops.conv_gram`).
"""

from __future__ import annotations

import torch

from spamkern.dispatch import register_impl, select_backend, select_impl


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


# elements of the (chunk, d, d) products gram_of_columns sums at a time
_CHUNK_ELEMENTS = 1 << 20


def gram_of_columns(g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out += Σ_n g_n g_nᵀ`` for ``g`` of shape (n, d, s): the Gram of the rows of
    ``g.transpose(1, 2)`` stacked, without that transposed copy — for a convolution's
    output gradients (samples, channels, positions). Batched (d, s) by (s, d) products,
    summed a chunk at a time: with a few channels over many positions the copy and a
    product d columns wide cost several times these (3× for 6 channels over 576)."""
    if g.ndim != 3:
        raise ValueError(f"gram_of_columns expects (n, d, s), got shape {tuple(g.shape)}")
    step = max(1, _CHUNK_ELEMENTS // (g.shape[1] * g.shape[1]))
    for chunk in g.split(step):
        part = torch.bmm(chunk, chunk.mT).sum(0)
        out = part if out is None else out.add_(part)
    return out


def mirror_upper_(m: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of (a stack of) square matrices onto the lower, in place.

    After ``triu_`` the strict lower triangle of the transposed view holds exactly the
    upper entries, so one copy of that triangle completes the matrix (a third less
    memory traffic than copying the strict upper triangle first)."""
    return m.triu_().add_(torch.tril(m.mT, -1))
