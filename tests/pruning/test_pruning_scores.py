"""Each score against a direct computation of its formula on a small float64 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import DiagPosterior, classification_data, make_cnn, make_mlp, n_params
from torch import nn
from torch.func import functional_call

from spamkern.pruning import (
    grasp_scores,
    magnitude_scores,
    obd_scores,
    opd_scores,
    random_scores,
    snip_scores,
    synflow_scores,
)
from spamkern.pruning.scores import flatten_scores, scores_to_dict


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _loss_of_flat(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        params, off = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = theta[off : off + k].view(s)
            off += k
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return f


def test_opd_equals_half_theta_squared_precision():
    model = make_mlp()
    p = n_params(model)
    g = torch.Generator().manual_seed(3)
    curv = torch.rand(p, generator=g, dtype=torch.float64) * 5
    prior = torch.rand(p, generator=g, dtype=torch.float64) + 0.1
    post = DiagPosterior(model, curv, prior, scale=0.37)
    theta = _flat(model)
    expected = 0.5 * theta**2 * (0.37 * curv + prior)
    torch.testing.assert_close(opd_scores(post), expected, rtol=1e-12, atol=0)
    as_dict = opd_scores(post, as_dict=True)
    assert list(as_dict) == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(flatten_scores(model, as_dict), expected, rtol=1e-12, atol=0)


def test_opd_rejects_unknown_posterior():
    with pytest.raises(TypeError, match="opd_scores cannot read"):
        opd_scores(object())


def test_opd_on_fitted_posteriors():
    import spamkern as sk

    model = make_mlp()
    x, y = classification_data(41, (7,), 3)
    for structure in ("kron", "diag"):
        for prior in ("scalar", "layerwise", "unitwise", "parameterwise"):
            post = sk.fit_laplace(
                model, (x, y), structure=structure, prior=prior, prior_precision=0.7, progress=False
            )
            expected = 0.5 * _flat(model) ** 2 * post.precision_diag().detach()
            torch.testing.assert_close(opd_scores(post), expected, rtol=1e-10, atol=1e-14)


def test_magnitude_and_random():
    model = make_cnn()
    torch.testing.assert_close(magnitude_scores(model), _flat(model).abs(), rtol=0, atol=0)
    a = random_scores(model, torch.Generator().manual_seed(5))
    b = random_scores(model, torch.Generator().manual_seed(5))
    c = random_scores(model, torch.Generator().manual_seed(6))
    assert a.shape == (n_params(model),) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) < 1


def test_snip_matches_direct_gradient():
    model = make_cnn()
    x, y = classification_data(23, (2, 6, 6), 4)
    theta = _flat(model).requires_grad_()
    (g,) = torch.autograd.grad(_loss_of_flat(model, x, y)(theta), theta)
    expected = (theta.detach() * g).abs()
    # batch_size 5 checks that batches are weighted into the mean over all 23 samples
    torch.testing.assert_close(snip_scores(model, (x, y), batch_size=5), expected)


def test_grasp_matches_dense_hessian():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = classification_data(19, (5,), 3)
    f = _loss_of_flat(model, x, y)
    theta = _flat(model)
    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(t), t)
    H = torch.autograd.functional.hessian(f, theta)
    expected = theta * (H @ g)
    torch.testing.assert_close(grasp_scores(model, (x, y), batch_size=4), expected)


def test_synflow_two_layer_formula():
    # R = 1ᵀ|W2||W1|1 ⇒ ∂R/∂W1[i, j] = Σ_k |W2[k, i]|, ∂R/∂W2[k, i] = Σ_j |W1[i, j]|.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)).double()
    w1, w2 = (m.weight.detach().clone() for m in model)
    s = synflow_scores(model, (6,), as_dict=True)
    torch.testing.assert_close(s["0.weight"], w1.abs() * w2.abs().sum(0).unsqueeze(1))
    torch.testing.assert_close(s["1.weight"], w2.abs() * w1.abs().sum(1).unsqueeze(0))
    assert torch.equal(model[0].weight, w1)  # the model keeps its signs


def test_synflow_matches_abs_network_gradient():
    model = make_cnn()
    params = {n: p.detach().abs().clone().requires_grad_() for n, p in model.named_parameters()}
    r = functional_call(model, params, (torch.ones(1, 2, 6, 6, dtype=torch.float64),)).sum()
    grads = torch.autograd.grad(r, list(params.values()))
    expected = torch.cat([(p * g).abs().reshape(-1) for p, g in zip(params.values(), grads)])
    torch.testing.assert_close(synflow_scores(model, (2, 6, 6)), expected)


def _ggn_diag(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    out = []
    for xi in x:
        params = {n: p.detach() for n, p in model.named_parameters()}
        jac = torch.autograd.functional.jacobian(
            lambda *ps, xi=xi: functional_call(model, dict(zip(names, ps)), (xi[None],))[0],
            tuple(params.values()),
        )
        J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
        p = functional_call(model, params, (xi[None],))[0].softmax(-1)
        lam = torch.diag(p) - torch.outer(p, p)
        out.append(torch.einsum("cp,cd,dp->p", J, lam, J))
    return torch.stack(out).sum(0)


def test_obd_uses_ggn_diagonal():
    model = make_mlp()
    x, y = classification_data(17, (7,), 3)
    expected = 0.5 * _flat(model) ** 2 * _ggn_diag(model, x)
    torch.testing.assert_close(obd_scores(model, (x, y)), expected, rtol=1e-8, atol=1e-12)


def test_obd_reuses_a_given_posterior():
    model = make_mlp()
    h = torch.rand(n_params(model), dtype=torch.float64)
    post = DiagPosterior(model, h, torch.zeros_like(h), 1.0)
    torch.testing.assert_close(obd_scores(model, posterior=post), 0.5 * _flat(model) ** 2 * h)


def test_scores_alignment_errors():
    model = make_mlp()
    with pytest.raises(ValueError, match="P = "):
        scores_to_dict(model, torch.zeros(5))
    with pytest.raises(ValueError, match="not a trainable parameter"):
        scores_to_dict(model, {"nope": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        scores_to_dict(model, {"0.weight": torch.zeros(7, 13)})
    with pytest.raises(TypeError):
        scores_to_dict(model, [1.0, 2.0])


def test_scores_accept_batch_iterables():
    model = make_mlp()
    x, y = classification_data(20, (7,), 3)
    tuples = [(x[:12], y[:12]), (x[12:], y[12:])]
    dicts = [{"input": a, "labels": b} for a, b in tuples]
    expected = snip_scores(model, (x, y))
    torch.testing.assert_close(snip_scores(model, tuples), expected)
    torch.testing.assert_close(snip_scores(model, dicts), expected)
    with pytest.raises(ValueError, match="keys"):
        snip_scores(model, [{"features": x, "y": y}])
    with pytest.raises(TypeError, match="tuple"):
        snip_scores(model, 3)


def test_opd_reads_a_laplace_torch_posterior():
    laplace = pytest.importorskip("laplace")
    model = make_mlp()
    x, y = classification_data(31, (7,), 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(loader)
    la.prior_precision = 0.3
    precision = la.posterior_precision.detach()  # diag: H / T + δ
    expected = 0.5 * _flat(model) ** 2 * precision
    torch.testing.assert_close(opd_scores(la), expected, rtol=1e-10, atol=1e-14)
