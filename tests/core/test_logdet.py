"""log det of the posterior precision and its diagonal against dense float64 matrices.

Π = s·K + diag(δ) with K the block-diagonal curvature (kron(G, A) per weight, G per bias, the
exact diagonal for other tensors), s = 1/T (1/(Tσ²) for regression), T = 0.7, σ = 1.3 and
random, non-uniform hyperparameters. scalar/layerwise/unitwise and every diag posterior are
exact; parameterwise Kronecker blocks are Hadamard's upper bound, equal to the exact value
when the factors are diagonal.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

import spamkern as sk
from spamkern.posterior import LaplacePosterior

from . import models as M
from .dense import dense_precision, expected_log_prior, rel_err
from .fitting import SIGMA, T, fit_perturbed

TOL = 1e-8
PRIORS = ["scalar", "layerwise", "unitwise", "parameterwise"]
CASES = {
    "mlp": (M.mlp, "classification"),
    "cnn": (partial(M.cnn, n=5), "classification"),
    "mixed": (M.mixed, "classification"),
    "reg-mlp": (M.regression_mlp, "regression"),
    "reg-cnn": (M.regression_cnn, "regression"),
    # fewer samples than inputs: rank-deficient A, eigenvalues clamped at 0
    "mlp-few": (partial(M.mlp, n=3, d_in=6), "classification"),
}


def _fit(case: str, prior: str, structure: str = "kron", seed: int = 0):
    return fit_perturbed(
        CASES[case], prior, structure, seed, batch_size=4, perturb_offset=100, prior_precision=0.9
    )[0]


def _exact_logdet(post) -> torch.Tensor:
    return torch.linalg.slogdet(dense_precision(post))[1]


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("case", list(CASES))
def test_logdet_and_precision_diag_against_dense(case, prior):
    post = _fit(case, prior, seed=1)
    assert post.curvature_scale == pytest.approx(
        1 / (T * SIGMA**2) if post.likelihood == "regression" else 1 / T, rel=1e-15
    )
    dense = dense_precision(post)
    exact = torch.linalg.slogdet(dense)[1]
    ours = post.log_det_posterior_precision().detach()
    if prior == "parameterwise":
        assert float(ours) >= float(exact) - TOL * abs(float(exact))
    else:
        assert float(ours) == pytest.approx(float(exact), rel=TOL)
    assert rel_err(post.precision_diag(), dense.diagonal()) < TOL
    assert rel_err(post.prior.precision_diag(), expected_log_prior(post.prior).exp()) < 1e-14


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("case", ["mlp", "mixed", "reg-cnn"])
def test_diag_posterior_is_exact_for_every_prior(case, prior):
    post = _fit(case, prior, structure="diag", seed=2)
    dense = dense_precision(post)
    assert float(post.log_det_posterior_precision().detach()) == pytest.approx(
        float(torch.linalg.slogdet(dense)[1]), rel=TOL
    )
    assert rel_err(post.precision_diag(), dense.diagonal()) < TOL


def _with_factors(post, transform) -> LaplacePosterior:
    """The same posterior with every Kronecker factor replaced by ``transform(factor)``."""
    curvature = copy.copy(post.curvature)
    curvature.factors = {i: [transform(F) for F in fs] for i, fs in post.curvature.factors.items()}
    return LaplacePosterior(
        post.model,
        curvature,
        post.prior,
        post.likelihood,
        post.structure,
        post.curvature_type,
        post.temperature,
        post.sigma_noise,
    )


@pytest.mark.parametrize("case", ["mlp", "cnn", "mixed"])
def test_parameterwise_is_exact_for_diagonal_factors(case):
    post = _with_factors(_fit(case, "parameterwise", seed=3), lambda F: torch.diag(F.diagonal()))
    exact = _exact_logdet(post)
    assert float(post.log_det_posterior_precision().detach()) == pytest.approx(
        float(exact), rel=TOL
    )


def test_parameterwise_is_the_hadamard_bound_in_the_eigenbasis():
    """log det ≈ Σ log diag(Qᵀ Π Q) per Kronecker block with Q = Q1 ⊗ Q2 (eigenvectors of the
    factors, computed here); strictly above the exact value for dense factors."""
    post = _fit("mlp", "parameterwise", seed=4)
    s = post.curvature_scale
    delta = expected_log_prior(post.prior).exp()
    bound = torch.zeros((), dtype=torch.float64)
    for block, factors in zip(post.blocks, post.kron_factors):
        sl = slice(block.offset, block.offset + block.numel)
        Q = torch.linalg.eigh(factors[0])[1]
        K = factors[0]
        if len(factors) == 2:
            Q = torch.kron(Q, torch.linalg.eigh(factors[1])[1])
            K = torch.kron(factors[0], factors[1])
        Pi = s * K + torch.diag(delta[sl])
        bound = bound + torch.log((Q.T @ Pi @ Q).diagonal()).sum()
    ours = post.log_det_posterior_precision().detach()
    assert float(ours) == pytest.approx(float(bound), rel=TOL)
    assert float(ours) > float(_exact_logdet(post)) + 1e-6


def test_default_log_precision_is_temperature_times_precision():
    """log δ = log(T·prior_precision) for every entry and every prior (unitwise
    splits it so that a_m + b_n is that value)."""
    model, _, _ = M.mixed(seed=0)
    named = [(n, p) for n, p in model.named_parameters()]
    for kind in PRIORS:
        prior = sk.make_prior(kind, named, prior_precision=2.5, temperature=T)
        expected = torch.full((prior.n_params,), 2.5 * T, dtype=torch.float64)
        assert rel_err(prior.precision_diag().detach(), expected) < 1e-14
