"""One-pass precision diagonal + OPD kernels against the direct float64 formulas."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, rel_err

from spamkern.ops.precision import kron_precision_and_opd, precision_and_opd

TOL = {torch.float32: 1e-6, torch.float64: 1e-14}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_and_opd_formula(triton_backend, dtype):
    n = 70001 + int(torch.randint(0, 1000, ()))  # two interpreter programs, ragged tail
    theta, curv, prior = (torch.randn(n, dtype=dtype, device=DEVICE) for _ in range(3))
    curv, prior = curv.abs(), prior.abs()
    scale = float(torch.rand(()) + 0.5)
    prec, score = precision_and_opd(theta, curv, prior, scale)
    expected = scale * curv.double() + prior.double()
    assert rel_err(prec, expected) <= TOL[dtype]
    assert rel_err(score, 0.5 * theta.double() ** 2 * expected) <= TOL[dtype]


def _blocks(dtype):
    """Weight (G, A) blocks, a bias (G only) and an exact diagonal block, odd sizes."""

    def r(n):
        return torch.rand(n, dtype=dtype, device=DEVICE)

    diag_g = [r(13), r(13), r(7), r(31), r(5)]
    diag_a = [r(29), None, r(3), None, r(211)]
    return diag_g, diag_a


def _kron_formula(diag_g, diag_a):
    parts = []
    for g, a in zip(diag_g, diag_a):
        parts.append(g.double() if a is None else (g.double()[:, None] * a.double()).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_kron_precision_and_opd_reads_factor_diagonals(triton_backend, dtype, tensor_scale):
    diag_g, diag_a = _blocks(dtype)
    curv = _kron_formula(diag_g, diag_a)
    theta = torch.randn(curv.numel(), dtype=dtype, device=DEVICE)
    prior = torch.rand(curv.numel(), dtype=dtype, device=DEVICE) + 0.1
    scale_value = float(torch.rand(()) + 0.5)
    scale = torch.tensor(scale_value, dtype=dtype, device=DEVICE) if tensor_scale else scale_value
    prec, score = kron_precision_and_opd(theta, diag_g, diag_a, prior, scale)
    expected = scale_value * curv + prior.double()
    assert rel_err(prec, expected) <= TOL[dtype]
    assert rel_err(score, 0.5 * theta.double() ** 2 * expected) <= TOL[dtype]


def test_kron_precision_and_opd_rejects_wrong_coverage(triton_backend):
    diag_g, diag_a = _blocks(torch.float32)
    theta = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="cover"):
        kron_precision_and_opd(theta, diag_g, diag_a, theta.abs(), 1.0)


def test_opd_custom_ops_pass_opcheck(triton_backend):
    theta, curv, prior = (torch.rand(301, device=DEVICE) for _ in range(3))
    scale = torch.full((1,), 0.5, device=DEVICE)
    torch.library.opcheck(
        torch.ops.spamkern.triton_precision_and_opd.default, (theta, curv, prior, scale)
    )
    g, a = (
        [torch.rand(7, device=DEVICE), torch.rand(7, device=DEVICE)],
        [
            torch.rand(43, device=DEVICE),
            torch.empty(0, device=DEVICE),
        ],
    )
    theta = torch.randn(7 * 43 + 7, device=DEVICE)
    torch.library.opcheck(
        torch.ops.spamkern.triton_kron_precision_and_opd.default,
        (theta, g, a, theta.abs(), scale),
    )
