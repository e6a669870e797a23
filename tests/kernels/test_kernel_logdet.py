"""Packed hyperstep log det: value and gradients against float64 formulas and dense logdet."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, rel_err

from spamkern.ops.logdet import EigLogdetPlan

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _case(dtype):
    """Eigenvalues and δ of a weight (parameterwise δ̃), a layerwise weight, a bias with a
    0-d δ and an exact diagonal block (δ per entry, λ2 ≡ 1); odd sizes."""

    def r(*shape):
        return torch.rand(*shape, dtype=dtype, device=DEVICE)

    one = torch.ones(1, dtype=dtype, device=DEVICE)
    l1 = [r(37), r(19), r(23), r(301)]
    l2 = [r(41), r(29), one, one]
    deltas = [r(37, 41) + 0.1, r(1) + 0.1, r(()) + 0.1, r(301, 1) + 0.1]
    return l1, l2, [d.requires_grad_() for d in deltas]


def _formula(l1, l2, deltas, scale):
    total = 0.0
    for a, b, d in zip(l1, l2, deltas):
        total = total + torch.log(scale * a.double()[:, None] * b.double()[None, :] + d).sum()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradients(triton_backend, dtype):
    l1, l2, deltas = _case(dtype)
    scale = torch.tensor(float(torch.rand(()) + 0.5), dtype=dtype, device=DEVICE)
    scale.requires_grad_()
    plan = EigLogdetPlan(l1, l2)
    assert type(plan._impl).__name__ == "TritonEigLogdetPlan"
    value = plan(deltas, scale)
    grads = torch.autograd.grad(3.0 * value, [*deltas, scale])

    ref_deltas = [d.detach().double().requires_grad_() for d in deltas]
    ref_scale = scale.detach().double().requires_grad_()
    expected = _formula(l1, l2, ref_deltas, ref_scale)
    ref_grads = torch.autograd.grad(3.0 * expected, [*ref_deltas, ref_scale])
    assert value.dtype == dtype and value.ndim == 0
    assert rel_err(value, expected) <= TOL[dtype]
    for g, ref in zip(grads, ref_grads):
        assert g.shape == ref.shape
        assert rel_err(g, ref) <= TOL[dtype]


def test_repeated_hypersteps_reuse_the_plan(triton_backend):
    """Adam on log δ through the plan follows the reference step by step."""
    l1, l2, deltas = _case(torch.float64)
    log_d = [d.detach().log().requires_grad_() for d in deltas]
    log_ref = [d.detach().clone().requires_grad_() for d in log_d]
    plan = EigLogdetPlan(l1, l2)
    opt, opt_ref = torch.optim.Adam(log_d, lr=0.1), torch.optim.Adam(log_ref, lr=0.1)
    for _ in range(5):
        for params, optimiser, fn in ((log_d, opt, plan), (log_ref, opt_ref, None)):
            optimiser.zero_grad()
            ds = [p.exp() for p in params]
            loss = plan(ds, 0.9) if fn is not None else _formula(l1, l2, ds, 0.9)
            loss.backward()
            optimiser.step()
    for a, b in zip(log_d, log_ref):
        assert rel_err(a, b) <= 1e-12
    assert len(plan._impl._tables) == 1


def test_matches_dense_logdet_of_the_kronecker_precision(triton_backend):
    """Σ log(s λ1 λ2 + δ) is log det(s·G⊗A + δI) for the factors' eigenvalues."""
    g = torch.randn(7, 11, dtype=torch.float64, device=DEVICE)
    a = torch.randn(5, 13, dtype=torch.float64, device=DEVICE)
    G, A = g @ g.T, a @ a.T
    l1, l2 = torch.linalg.eigvalsh(G).clamp_min(0), torch.linalg.eigvalsh(A).clamp_min(0)
    delta, scale = 0.37, 1.7
    value = EigLogdetPlan([l1], [l2])([torch.tensor(delta, dtype=torch.float64)], scale)
    dense = torch.logdet(scale * torch.kron(G, A) + delta * torch.eye(35, dtype=torch.float64))
    assert rel_err(value, dense) <= 1e-12


def test_delta_shape_must_broadcast(triton_backend):
    l1, l2, deltas = _case(torch.float32)
    deltas[0] = torch.rand(36, 41, device=DEVICE)
    with pytest.raises(ValueError, match="does not broadcast"):
        EigLogdetPlan(l1, l2)(deltas, 1.0)


def test_logdet_custom_op_passes_opcheck(triton_backend):
    l1, l2, deltas = _case(torch.float64)
    plan = EigLogdetPlan(l1, l2)._impl
    tables = plan._tables_for(tuple(tuple(d.shape) for d in deltas))
    packed = torch.cat([d.detach().reshape(-1) for d in deltas]).requires_grad_()
    scale = torch.full((1,), 0.8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.spamkern.triton_eig_logdet.default,
        (plan.l1, plan.l2, packed, scale, *tables, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
