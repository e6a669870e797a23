"""The fit every evidence test starts from: a case's model and data, T = 0.7, σ = 1.3 for
regression, and randomly perturbed (non-uniform) prior precisions."""

from __future__ import annotations

import spamkern as sk

from .dense import perturb_prior

T = 0.7
SIGMA = 1.3


def fit_perturbed(
    case: tuple,
    prior: str,
    structure: str,
    seed: int,
    *,
    batch_size: int,
    perturb_offset: int,
    prior_precision: float = 1.0,
):
    """(posterior, model, X, y) for ``case`` = (model factory, likelihood)."""
    factory, likelihood = case
    model, X, y = factory(seed=seed)
    post = sk.fit_laplace(
        model,
        (X, y),
        likelihood=likelihood,
        structure=structure,
        prior=prior,
        prior_precision=prior_precision,
        temperature=T,
        sigma_noise=SIGMA if likelihood == "regression" else 1.0,
        batch_size=batch_size,
        progress=False,
    )
    perturb_prior(post, seed=seed + perturb_offset)
    return post, model, X, y
