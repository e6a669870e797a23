"""The entry-wise terms of a parameterwise evidence evaluation, each one pass over a block.

Between and after the four matrix products that project a block's prior precisions into its
Kronecker eigenbasis (:mod:`spamkern.posterior.projected`), an evaluation runs a chain of
entry-wise operations over the whole block. One torch op at a time, that chain reads and
writes the block's arrays about eighteen times; on an MLP's 256 × 784 first layer (2·10⁵
entries) each such pass costs 0.2–0.3 ms once the products have evicted the arrays from the
core's cache, as much as a third of the products themselves. These three ops are the chain
in three passes: the C++ kernels (``spamkern._C``, registered as ``"cpp"``) fuse each into
one; the torch versions here are the reference they are tested against.

``factor`` multiplies every precision (e^t for a shift t of all of a block's log δ);
``backend`` demands one implementation ("torch" or "cpp"), as everywhere in spamkern.ops.
"""

from __future__ import annotations

import torch

from spamkern.dispatch import register_impl, select_impl
from spamkern.ops.reductions import float64_sum

# projected_precision's ``side``: no sums along a side, sums over each row, over each column
SIDES = {None: 0, "rows": 1, "cols": 2}


def projected_precision(
    projected: torch.Tensor,
    products: torch.Tensor,
    scale: float,
    factor: float,
    side: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, 1/c, Σ ρ² in float64, ρ² summed along ``side``) for c = factor·δ̃ + scale·P and
    ρ = factor·δ̃/c, over (…, p, q) matrices ``projected`` (δ̃) and ``products`` (P): ``side``
    1 sums each row (…, p), 2 each column (…, q), 0 none (an empty tensor)."""
    _check_side(side)
    _check_same("projected_precision", projected=projected, products=products)
    if projected.ndim < 2:
        raise ValueError(
            f"projected_precision needs (..., p, q) matrices, got shape {tuple(projected.shape)}"
        )
    impl = select_impl("projected_precision", projected, backend=backend)
    return impl(projected, products, float(scale), float(factor), side)


def parameterwise_gradient(
    inverse: torch.Tensor,
    squares: torch.Tensor,
    delta: torch.Tensor,
    log_delta: torch.Tensor,
    factor: float,
    rows: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """(own, grad, scatter, own per row, own per column, [Σ scatter, Σ log δ] in float64) for
    a block's entries laid out as ``rows`` rows: with δ' = factor·δ, own = ½δ'(Σ_ii + θ²) (each
    entry's own curvature), grad = ½ − own (∂E/∂log δ) and scatter = δ'θ²; ``inverse`` is
    diag Π⁻¹ (Σ_ii), ``squares`` θ². The log δ sum is of ``log_delta`` as given."""
    _check_same(
        "parameterwise_gradient", inverse=inverse, squares=squares, delta=delta,
        log_delta=log_delta,
    )  # fmt: skip
    if rows < 1 or inverse.numel() % rows:
        raise ValueError(
            f"parameterwise_gradient: {inverse.numel()} entries do not split into {rows} rows"
        )
    impl = select_impl("parameterwise_gradient", inverse, backend=backend)
    return impl(inverse, squares, delta, log_delta, float(factor), int(rows))


def shift_sums(
    projected: torch.Tensor,
    products: torch.Tensor,
    scale: float,
    factor: float,
    backend: str | None = None,
) -> torch.Tensor:
    """[Σ ρ, Σ ρ²] in float64 for ρ = factor·δ̃/(factor·δ̃ + scale·P): the derivatives of a
    block's log det along a shift of all its log δ."""
    _check_same("shift_sums", projected=projected, products=products)
    impl = select_impl("shift_sums", projected, backend=backend)
    return impl(projected, products, float(scale), float(factor))


def _check_same(op: str, **tensors: torch.Tensor) -> None:
    """One floating dtype (float32 or float64), one shape, one device for every operand."""
    (first, ref), *rest = tensors.items()
    if ref.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: {first} must be float32 or float64, got {ref.dtype}")
    for name, t in rest:
        if t.dtype != ref.dtype or t.shape != ref.shape or t.device != ref.device:
            raise ValueError(
                f"{op}: {name} ({t.dtype}, {tuple(t.shape)}, {t.device}) must match {first} "
                f"({ref.dtype}, {tuple(ref.shape)}, {ref.device})"
            )


def _check_side(side: int) -> None:
    if side not in SIDES.values():
        raise ValueError(f"side must be 0 (none), 1 (rows) or 2 (columns), got {side!r}")


@register_impl("projected_precision", "torch")
def projected_precision_reference(projected, products, scale, factor, side):
    scaled = projected * factor if factor != 1.0 else projected
    c = torch.add(scaled, products, alpha=scale)
    reciprocal = c.reciprocal()
    squares = (scaled * reciprocal).square()
    if side == 1:
        along = squares.sum(-1)
    elif side == 2:
        along = squares.sum(-2)
    else:
        along = squares.new_empty(0)
    return c, reciprocal, float64_sum(squares), along


@register_impl("parameterwise_gradient", "torch")
def parameterwise_gradient_reference(inverse, squares, delta, log_delta, factor, rows):
    scaled = delta * factor if factor != 1.0 else delta
    scatter = scaled * squares
    own = (scaled * inverse + scatter).mul_(0.5)
    grad = torch.rsub(own, 0.5)
    matrix = own.reshape(rows, -1)
    sums = torch.stack([float64_sum(scatter), float64_sum(log_delta)])
    return own, grad, scatter, matrix.sum(1), matrix.sum(0), sums


@register_impl("shift_sums", "torch")
def shift_sums_reference(projected, products, scale, factor):
    scaled = projected * factor
    rho = scaled / torch.add(scaled, products, alpha=scale)
    flat = rho.reshape(-1)
    return torch.stack([float64_sum(flat), torch.dot(flat, flat).double()])
