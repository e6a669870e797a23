"""Hyperparameter-like arguments: NaN, ±∞, zero, negatives and wrong types get a clear error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import spamkern as sk


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _regression():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(
        16, 2, generator=g, dtype=torch.float64
    )


def _classification():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (16,), generator=g
    )


KWARGS = dict(n_epochs=1, n_hypersteps=1, progress=False)
BAD_POSITIVE = [math.inf, -math.inf, math.nan, 0.0, -1.0]


@pytest.mark.parametrize("sigma", BAD_POSITIVE)
def test_sigma_noise_must_be_finite_and_positive(sigma):
    with pytest.raises(ValueError, match="sigma_noise must be > 0 and finite"):
        sk.marglik_train(
            _mlp(), _regression(), likelihood="regression", sigma_noise=sigma, **KWARGS
        )
    with pytest.raises(ValueError, match="sigma_noise must be > 0 and finite"):
        sk.fit_laplace(_mlp(), _regression(), likelihood="regression", sigma_noise=sigma)


def test_a_posterior_refuses_an_infinite_sigma_directly():
    post = sk.fit_laplace(_mlp(), _regression(), likelihood="regression", progress=False)
    for sigma in BAD_POSITIVE:
        with pytest.raises(ValueError, match="sigma_noise must be > 0 and finite"):
            post.log_marginal_likelihood(sigma_noise=sigma)
    with pytest.raises(ValueError, match="sigma_noise must be one finite number > 0"):
        type(post)(
            post.model, post.curvature, post.prior, "regression", "kron", "ggn", 1.0, math.inf
        )


def test_sigma_noise_for_classification_is_refused_before_training():
    calls = []
    with pytest.raises(ValueError, match="sigma_noise applies to regression only"):
        sk.marglik_train(
            _mlp(),
            _classification(),
            sigma_noise=2.0,
            n_epochs_burnin=5,
            on_epoch_end=calls.append,
            **KWARGS,
        )
    assert calls == []  # refused up front, not after an epoch


@pytest.mark.parametrize("name", ["temperature", "lr_hyp"])
@pytest.mark.parametrize("value", BAD_POSITIVE)
def test_rates_and_temperature_must_be_finite_and_positive(name, value):
    with pytest.raises(ValueError, match=f"{name} must be > 0 and finite"):
        sk.marglik_train(_mlp(), _classification(), **{**KWARGS, name: value})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1e-3])
def test_lr_must_be_finite_and_not_negative(value):
    with pytest.raises(ValueError, match="need a finite lr >= 0"):
        sk.marglik_train(_mlp(), _classification(), **{**KWARGS, "lr": value})


@pytest.mark.parametrize("value", [0.0, -2.0, math.inf, math.nan])
def test_prior_precision_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match="prior precisions must be finite and > 0"):
        sk.marglik_train(_mlp(), _classification(), prior_precision=value, **KWARGS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_epochs": True}, "n_epochs must be an integer >= 1"),
        ({"marglik_frequency": 2.0}, "marglik_frequency must be an integer >= 1"),
        ({"n_epochs_burnin": 0.5}, "n_epochs_burnin must be an integer >= 0"),
        ({"n_hypersteps": 1.5}, "n_hypersteps must be an integer >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"optimizer": "sgd", "momentum": -1.0}, r"momentum must be a number in \[0, 1\)"),
        ({"likelihood": "classif"}, "likelihood must be one of"),
        ({"temperature": "1"}, "temperature must be a positive number"),
    ],
)
def test_counts_and_choices_are_checked_before_the_data(kwargs, message):
    error = TypeError if "positive number" in message else ValueError
    with pytest.raises(error, match=message):
        sk.marglik_train(_mlp(), _classification(), **{**KWARGS, **kwargs})


def test_parameters_on_two_dtypes_are_refused():
    model = _mlp()
    model[2].float()
    with pytest.raises(TypeError, match="all trainable parameters in one dtype"):
        sk.fit_laplace(model, _classification(), progress=False)
