"""The fused entry-wise ops of a parameterwise evaluation (spamkern.ops.parameterwise): the
C++ kernels and the torch reference against the formulas written out in float64, in float32
and float64, with leading slices, zero eigenvalue products, every side, a size that takes the
kernels' threaded path, and bad inputs refused by both."""

from __future__ import annotations

import pytest
import torch

from spamkern.ops.parameterwise import parameterwise_gradient, projected_precision, shift_sums

BACKENDS = ("torch", "cpp")
SHAPES = [(7, 5), (3, 4, 6), (300, 257)]  # the last: 77 100 entries, the threaded path


def _operands(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    projected = torch.rand(shape, generator=g, dtype=torch.float64) * 3 + 0.05
    products = torch.rand(shape, generator=g, dtype=torch.float64) * 40
    products.view(-1)[::5] = 0.0  # zero eigenvalues (a clamped factor)
    return projected.to(dtype), products.to(dtype)


def _tolerance(dtype):
    return (
        {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [0, 1, 2])
def test_projected_precision_matches_the_formulas(backend, dtype, shape, side):
    projected, products = _operands(shape, dtype)
    scale, factor = 0.37, 1.9
    c, reciprocal, total, along = projected_precision(
        projected, products, scale, factor, side, backend=backend
    )
    d, p = projected.double(), products.double()
    c_ref = factor * d + scale * p
    ratio_sq = (factor * d / c_ref) ** 2
    tol = _tolerance(dtype)
    torch.testing.assert_close(c.double(), c_ref, **tol)
    torch.testing.assert_close(reciprocal.double(), 1 / c_ref, **tol)
    assert total.dtype == torch.float64 and total.ndim == 0
    assert float(total) == pytest.approx(float(ratio_sq.sum()), rel=tol["rtol"])
    if side == 0:
        assert along.numel() == 0
    else:
        ref = ratio_sq.sum(-1) if side == 1 else ratio_sq.sum(-2)
        assert along.dtype == dtype
        torch.testing.assert_close(along.double(), ref, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,cols", [(6, 5), (256, 1), (300, 257)])
def test_parameterwise_gradient_matches_the_formulas(backend, dtype, rows, cols):
    g = torch.Generator().manual_seed(1)
    n = rows * cols
    inverse = torch.rand(n, generator=g, dtype=torch.float64) * 0.1
    squares = torch.rand(n, generator=g, dtype=torch.float64) * 0.01
    log_delta = torch.randn(n, generator=g, dtype=torch.float64) * 2
    factor = 0.6
    args = [t.to(dtype) for t in (inverse, squares, log_delta.exp(), log_delta)]
    own, grad, scatter, own_rows, own_cols, sums = parameterwise_gradient(
        *args, factor, rows, backend=backend
    )
    delta = factor * log_delta.exp()
    own_ref = 0.5 * delta * (inverse + squares)
    tol = _tolerance(dtype)
    torch.testing.assert_close(own.double(), own_ref, **tol)
    torch.testing.assert_close(grad.double(), 0.5 - own_ref, **tol)
    torch.testing.assert_close(scatter.double(), delta * squares, **tol)
    torch.testing.assert_close(own_rows.double(), own_ref.view(rows, cols).sum(1), **tol)
    torch.testing.assert_close(own_cols.double(), own_ref.view(rows, cols).sum(0), **tol)
    assert sums.dtype == torch.float64
    expected = torch.stack([(delta * squares).sum(), args[3].double().sum()])
    torch.testing.assert_close(sums, expected, rtol=tol["rtol"], atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_shift_sums_match_the_formulas(backend, dtype, shape):
    projected, products = _operands(shape, dtype, seed=2)
    scale, factor = 1.3, 0.45
    sums = shift_sums(projected, products, scale, factor, backend=backend)
    d = factor * projected.double()
    rho = d / (d + scale * products.double())
    expected = torch.stack([rho.sum(), (rho**2).sum()])
    torch.testing.assert_close(sums, expected, rtol=_tolerance(dtype)["rtol"], atol=1e-9)


def test_the_kernels_are_deterministic_and_take_the_custom_op_checks():
    """Same inputs, same bits (per-row partial sums combined in a fixed order), and the
    registered ops pass torch's schema / fake-tensor checks (so they trace)."""
    projected, products = _operands((300, 257), torch.float32)
    first = projected_precision(projected, products, 0.5, 1.0, 2, backend="cpp")
    again = projected_precision(projected, products, 0.5, 1.0, 2, backend="cpp")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    ops = torch.ops.spamkern
    torch.library.opcheck(ops.projected_precision.default, (projected, products, 0.5, 1.0, 1))
    flat = [projected.reshape(-1)] * 4
    torch.library.opcheck(ops.parameterwise_gradient.default, (*flat, 1.0, 300))
    torch.library.opcheck(ops.shift_sums.default, (projected, products, 0.5, 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_operands_are_refused(backend):
    projected, products = _operands((4, 5), torch.float32)
    with pytest.raises(ValueError, match="must match projected"):
        projected_precision(projected, products.double(), 1.0, 1.0, 0, backend=backend)
    with pytest.raises(ValueError, match="must match projected"):
        shift_sums(projected, products[:3], 1.0, 1.0, backend=backend)
    with pytest.raises(ValueError, match="float32 or float64"):
        projected_precision(projected.half(), products.half(), 1.0, 1.0, 0, backend=backend)
    with pytest.raises(ValueError, match="side must be"):
        projected_precision(projected, products, 1.0, 1.0, 3, backend=backend)
    with pytest.raises(ValueError, match=r"\(\.\.\., p, q\) matrices"):
        projected_precision(projected[0], products[0], 1.0, 1.0, 0, backend=backend)
    flat = projected.reshape(-1)
    with pytest.raises(ValueError, match="do not split into 3 rows"):
        parameterwise_gradient(flat, flat, flat, flat, 1.0, 3, backend=backend)
    with pytest.raises(ValueError, match="log_delta"):
        parameterwise_gradient(flat, flat, flat, flat[:-1], 1.0, 4, backend=backend)


def test_the_cpp_kernels_check_their_operands_themselves():
    """Called directly (torch.ops), the kernels refuse what the Python wrappers refuse."""
    projected, products = _operands((4, 5), torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.spamkern.projected_precision(projected, products.double(), 1.0, 1.0, 0)
    with pytest.raises(RuntimeError, match="side must be"):
        torch.ops.spamkern.projected_precision(projected, products, 1.0, 1.0, 5)
    flat = projected.reshape(-1)
    with pytest.raises(RuntimeError, match="do not split"):
        torch.ops.spamkern.parameterwise_gradient(flat, flat, flat, flat, 1.0, 3)
