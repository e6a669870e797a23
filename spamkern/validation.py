"""Argument checks shared by the public entry points.

Bad input gets a ValueError/TypeError that says what was wrong and what is accepted, at the
start of a call, instead of a silent wrong answer (an infinite noise level giving an evidence
of −inf) or a crash deep inside torch after minutes of training.

Half precision: the curvature sums over the whole data set overflow float16 (max 65504) and
the log determinants and eigendecompositions of the evidence need more digits than float16
or bfloat16 carry (and ``torch.linalg.eigh`` has no half kernel on the CPU), so fitting a
posterior or training the prior requires float32 or float64 parameters. The predictives
accept half-precision models: they compute in the posterior's precision and return the
model's dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from spamkern.curvature.likelihood import check_curvature, check_likelihood
from spamkern.data.batches import TensorBatches
from spamkern.ops.reductions import all_finite

HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_positive_finite(name: str, value: Any) -> float:
    """A real number in (0, ∞); NaN, ±∞, 0, negatives and non-numbers are refused."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (is_number or (isinstance(value, torch.Tensor) and value.numel() == 1)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    number = float(value.detach() if isinstance(value, torch.Tensor) else value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {number}")
    return number


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An integer ≥ ``minimum`` (bools and floats such as 1.5 are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_sigma_noise(sigma_noise: Any, likelihood: str) -> float:
    """σ of the Gaussian likelihood: finite and > 0; classification has none (σ = 1)."""
    sigma = check_positive_finite("sigma_noise", sigma_noise)
    if likelihood != "regression" and sigma != 1.0:
        raise ValueError(
            f"sigma_noise applies to regression only, got sigma_noise={sigma} with "
            f"likelihood={likelihood!r}"
        )
    return sigma


def check_marglik_args(
    *,
    n_epochs: Any,
    marglik_frequency: Any,
    likelihood: str,
    curvature: str,
    sigma_noise: Any,
    temperature: Any,
    n_epochs_burnin: Any,
    n_hypersteps: Any,
    lr: Any,
    lr_hyp: Any,
    momentum: Any,
    seed: Any,
) -> None:
    """Everything ``marglik_train`` can check before touching the data."""
    check_likelihood(likelihood)
    check_curvature(curvature)
    check_sigma_noise(sigma_noise, likelihood)
    check_positive_finite("temperature", temperature)
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"need a finite lr >= 0 (0: curvature only), got lr={lr!r}")
    check_positive_finite("lr_hyp", lr_hyp)
    check_count("n_epochs", n_epochs, minimum=1)
    check_count("marglik_frequency", marglik_frequency, minimum=1)
    check_count("n_epochs_burnin", n_epochs_burnin)
    check_count("n_hypersteps", n_hypersteps)
    if isinstance(momentum, bool) or not (isinstance(momentum, numbers.Real) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


HALF_LAPLACE = (
    "the curvature sums and the evidence's log determinants lose all accuracy (or overflow) "
    "in half precision. Convert with model.float(); the predictives (map_predictive, "
    "glm_predictive) accept half-precision models afterwards"
)
HALF_OPTIMISER = (
    "optimiser steps on half-precision parameters lose the small updates (float16 also "
    "rounds Adam's eps to 0 and goes NaN). Keep float32 parameters; for mixed precision run "
    "it under torch.autocast"
)


def check_model_params(
    params: Iterable[torch.Tensor], what: str, half_reason: str = HALF_LAPLACE
) -> None:
    """One floating dtype (float32/float64) and one device for every trainable tensor."""
    params = list(params)
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(devices) > 1:
        found = sorted(map(str, devices))
        raise ValueError(f"{what} needs all trainable parameters on one device, found {found}")
    if len(dtypes) > 1:
        raise TypeError(
            f"{what} needs all trainable parameters in one dtype, found "
            f"{sorted(map(str, dtypes))}; convert the model with model.to(dtype)"
        )
    (dtype,) = dtypes
    if dtype in HALF_DTYPES:
        raise TypeError(
            f"{what} needs float32 or float64 parameters, the model's are {dtype}: {half_reason}"
        )


def check_input_dtype(batches: Any, dtype: torch.dtype) -> None:
    """In-memory inputs in the model's dtype (else a matmul error deep inside the model)."""
    if not isinstance(batches, TensorBatches):
        return
    X = batches.X
    if X.is_floating_point() and X.dtype != dtype:
        raise TypeError(
            f"X is {X.dtype} but the model's parameters are {dtype}; convert with X.to({dtype})"
        )


def check_tensor_data(batches: Any, dtype: torch.dtype, likelihood: str) -> None:
    """In-memory training data: inputs in the model's dtype, finite inputs and targets (one
    check up front instead of a NaN loss blamed on the learning rate epochs later)."""
    if not isinstance(batches, TensorBatches):
        return
    check_input_dtype(batches, dtype)
    X, y = batches.X, batches.y
    if X.is_floating_point() and not all_finite(X):
        rows = (~torch.isfinite(X.reshape(X.shape[0], -1))).any(1).nonzero().flatten()
        raise ValueError(
            f"X contains NaN or Inf in {rows.numel()} rows (first: {rows[:5].tolist()})"
        )
    if likelihood == "regression" and y.is_floating_point() and not all_finite(y):
        raise ValueError("the regression targets y contain NaN or Inf")
