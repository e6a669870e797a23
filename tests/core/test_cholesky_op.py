"""spamkern.ops.cholesky: the LAPACK-direct C++ kernel and the torch reference give L with
A = L Lᵀ (float64 to 1e-12, float32 to 1e-5), zeros above the diagonal, the same info as
torch.linalg.cholesky_ex on a matrix that is not positive definite, and refuse bad input."""

from __future__ import annotations

import pytest
import torch

from spamkern.ops.cholesky import cholesky_lower


def _spd(n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a @ a.T + n * torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n", [1, 7, 256])
def test_the_factor_reproduces_the_matrix(backend, dtype, tol, n):
    matrix = _spd(n, dtype)
    factor, info = cholesky_lower(matrix, backend=backend)
    assert int(info) == 0 and info.dtype == torch.int32
    assert factor.dtype == dtype
    assert bool((factor.triu(1) == 0).all())
    assert bool((factor.diagonal() > 0).all())
    rebuilt = factor.double() @ factor.double().T
    torch.testing.assert_close(rebuilt, matrix.double(), rtol=tol, atol=tol * n)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_matrix_that_is_not_positive_definite_reports_its_first_bad_minor(backend):
    matrix = _spd(12, torch.float64)
    matrix[4, 4] = -1.0
    _, expected = torch.linalg.cholesky_ex(matrix)
    _, info = cholesky_lower(matrix, backend=backend)
    assert int(info) == int(expected) == 5


def test_bad_input_is_refused_and_the_op_checks_pass():
    with pytest.raises(ValueError, match="one square matrix"):
        cholesky_lower(torch.eye(3)[:2])
    with pytest.raises(ValueError, match="float32 or float64"):
        cholesky_lower(torch.eye(3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="one square matrix"):
        torch.ops.spamkern.cholesky_lower(torch.ones(2, 3))
    torch.library.opcheck(torch.ops.spamkern.cholesky_lower.default, (_spd(9, torch.float64),))
