"""The Laplace log evidence: its value against the dense formula, its gradients w.r.t. the
log prior precisions and log σ against central finite differences.

log p(D | δ) = −s·L − c_σ − ½ θᵀ diag(δ) θ − ½ log det(s·K + diag δ) + ½ Σ log δ,
s = 1/T (1/(Tσ²) for regression), c_σ = N·C·log(σ√(2π)) for the Gaussian likelihood.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import spamkern as sk

from . import models as M
from .dense import dense_curvature, dense_precision, expected_log_prior, flat_theta
from .fitting import SIGMA, T, fit_perturbed

PRIORS = ["scalar", "layerwise", "unitwise", "parameterwise"]
CASES = {
    "mlp": (M.mlp, "classification"),
    "mixed": (M.mixed, "classification"),
    "cnn": (partial(M.cnn, n=5), "classification"),
    "reg-mlp": (M.regression_mlp, "regression"),
    # fewer samples than inputs: rank-deficient A, eigenvalues clamped at 0
    "mlp-few": (partial(M.mlp, n=3, d_in=6), "classification"),
}


def _fit(case, prior, structure="kron", seed=0):
    return fit_perturbed(CASES[case], prior, structure, seed, batch_size=5, perturb_offset=50)


def _dense_lml(post, model, X, y, sigma: float) -> float:
    _, loss = dense_curvature(model, X, y, post.likelihood)
    log_delta = expected_log_prior(post.prior)
    theta = flat_theta(model)
    scale = 1 / T if post.likelihood == "classification" else 1 / (T * sigma**2)
    value = -scale * loss - 0.5 * (log_delta.exp() * theta**2).sum() + 0.5 * log_delta.sum()
    value = value - 0.5 * torch.linalg.slogdet(dense_precision(post))[1]
    if post.likelihood == "regression":
        value = value - len(y) * y.shape[1] * math.log(sigma * math.sqrt(2 * math.pi))
    return float(value)


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "unitwise"])
@pytest.mark.parametrize("case", ["mlp", "mixed", "reg-mlp"])
def test_value_matches_dense_formula(case, prior, structure):
    post, model, X, y = _fit(case, prior, structure, seed=1)
    sigma = SIGMA if post.likelihood == "regression" else 1.0
    lml = float(post.log_marginal_likelihood().detach())
    assert lml == pytest.approx(_dense_lml(post, model, X, y, sigma), rel=1e-8)


def _lml_at(post, log_precision: torch.Tensor) -> float:
    saved = post.prior.log_precision.detach().clone()
    with torch.no_grad():
        post.prior.log_precision.copy_(log_precision)
    try:
        return float(post.log_marginal_likelihood().detach())
    finally:
        with torch.no_grad():
            post.prior.log_precision.copy_(saved)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize(
    ("case", "structure"),
    [
        ("mlp", "kron"),
        ("cnn", "kron"),
        ("mixed", "kron"),
        ("reg-mlp", "kron"),
        ("mlp-few", "kron"),
        ("mlp", "diag"),
    ],
)
def test_gradient_wrt_log_precision(case, structure, prior):
    post, *_ = _fit(case, prior, structure, seed=2)
    lp = post.prior.log_precision
    lp.grad = None
    post.log_marginal_likelihood().backward()
    grad = lp.grad.detach().clone()
    assert torch.isfinite(grad).all()
    gen = torch.Generator().manual_seed(3)
    h = 1e-5
    base = lp.detach().clone()
    directions = [torch.randn(base.shape, generator=gen, dtype=base.dtype) for _ in range(3)]
    if base.numel() <= 8:  # every coordinate of small hyperparameter vectors
        directions += list(torch.eye(base.numel(), dtype=base.dtype))
    for v in directions:
        fd = (_lml_at(post, base + h * v) - _lml_at(post, base - h * v)) / (2 * h)
        assert float(grad @ v) == pytest.approx(fd, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("prior", ["layerwise", "unitwise"])
def test_gradient_wrt_log_sigma(prior):
    post, model, X, y = _fit("reg-mlp", prior, seed=4)
    log_sigma = torch.tensor(math.log(0.8), dtype=torch.float64, requires_grad=True)
    lml = post.log_marginal_likelihood(sigma_noise=log_sigma.exp())
    lml.backward()
    # the value at another σ is the dense formula at that σ (curvature rescaled by 1/σ²)
    refit = sk.fit_laplace(
        model, (X, y), likelihood="regression", prior=post.prior, temperature=T, sigma_noise=0.8
    )
    assert float(lml.detach()) == pytest.approx(_dense_lml(refit, model, X, y, 0.8), rel=1e-8)
    h = 1e-5

    def at(ls: float) -> float:
        sigma = torch.tensor(math.exp(ls), dtype=torch.float64)
        return float(post.log_marginal_likelihood(sigma_noise=sigma).detach())

    fd = (at(math.log(0.8) + h) - at(math.log(0.8) - h)) / (2 * h)
    assert float(log_sigma.grad) == pytest.approx(fd, rel=1e-6, abs=1e-6)


def test_prior_precision_argument_is_differentiable_and_leaves_the_prior_alone():
    """laplace-torch style: a length-(number of tensors) precision vector requiring grad."""
    post, *_ = _fit("mlp", "layerwise", seed=5)
    before = post.prior.log_precision.detach().clone()
    delta = torch.linspace(0.5, 3.0, len(post.blocks), dtype=torch.float64).requires_grad_()
    lml = post.log_marginal_likelihood(prior_precision=delta)
    lml.backward()
    assert torch.equal(post.prior.log_precision.detach(), before)
    h = 1e-6
    for i in range(len(post.blocks)):
        e = torch.zeros_like(delta).index_fill_(0, torch.tensor(i), h)
        up = post.log_marginal_likelihood(prior_precision=(delta + e).detach())
        down = post.log_marginal_likelihood(prior_precision=(delta - e).detach())
        fd = float(up - down) / (2 * h)
        assert float(delta.grad[i]) == pytest.approx(fd, rel=1e-6, abs=1e-6)
    same = post.log_marginal_likelihood(prior_precision=before.exp())
    assert float(same.detach()) == pytest.approx(
        float(post.log_marginal_likelihood().detach()), rel=1e-14
    )
