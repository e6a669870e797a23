"""Sparsity-inducing priors (scalar, layerwise, unitwise, parameterwise)."""

from spamkern.prior.priors import (
    PRIORS,
    LayerwisePrior,
    ParameterwisePrior,
    Prior,
    ScalarPrior,
    UnitwisePrior,
    make_prior,
)

__all__ = [
    "PRIORS",
    "LayerwisePrior",
    "ParameterwisePrior",
    "Prior",
    "ScalarPrior",
    "UnitwisePrior",
    "make_prior",
]
