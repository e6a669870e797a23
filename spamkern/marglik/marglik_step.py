"""The marglik step: a posterior at the current θ, then the prior's hyperparameter update.

The posterior comes from a refit pass over the training data or from the curvature
harvested during the epoch just trained (:mod:`spamkern.curvature.harvest`). Data-only
input factors found in the first pass are reused by every later one. Online pruning runs
right after the update; a prune moves θ, so the posterior is then marked stale and the
run refits before returning one.
"""

from __future__ import annotations

import torch

from spamkern.curvature.harvest import EpochHarvest
from spamkern.distributed import all_reduce_curvature, is_distributed
from spamkern.marglik.state import RunSettings, TrainingState
from spamkern.posterior.blocks import decompose_kron_blocks
from spamkern.posterior.fit import fit_laplace
from spamkern.posterior.laplace import LaplacePosterior


def fit_posterior(
    state: TrainingState,
    settings: RunSettings,
    fit_batches,
    generator: torch.Generator | None,
    harvest: EpochHarvest | None = None,
) -> LaplacePosterior:
    """The posterior under the live prior at the current θ: harvested or refitted."""
    sigma = float(state.log_sigma.detach().exp())
    if harvest is not None:
        curvature = harvest.curvature()
        if is_distributed():
            all_reduce_curvature(curvature)
        posterior = LaplacePosterior(
            state.model,
            curvature,
            state.prior,
            settings.likelihood,
            settings.structure,
            settings.curvature,
            settings.temperature,
            sigma,
        )
    else:
        posterior = fit_laplace(
            state.model,
            fit_batches,
            likelihood=settings.likelihood,
            structure=settings.structure,
            curvature=settings.curvature,
            prior=state.prior,
            temperature=settings.temperature,
            sigma_noise=sigma,
            generator=generator,
            dict_key_y=settings.dict_key_y,
            progress=False,
            input_factors=state.input_factors.given(),
        )
    state.input_factors.update(posterior.curvature)
    # every fixed eigenbasis in one batched call (equal factors decomposed once); the
    # scalar/layerwise evidence needs eigenvalues only (eigenvectors follow on demand)
    prior_kind = state.prior.kind
    planned = [b for b in posterior.curvature_blocks if b.uses_plan(prior_kind)]
    decompose_kron_blocks(planned, vectors=prior_kind == "parameterwise")
    state.posterior, state.posterior_is_current = posterior, True
    return posterior


def marglik_step(
    state: TrainingState, settings: RunSettings, posterior: LaplacePosterior, online_pruning=None
) -> float:
    """Update the prior (and σ) on ``posterior``, then prune online; returns the evidence."""
    marglik = state.hyper.step(posterior)
    posterior.log_sigma = state.log_sigma.detach().clone()
    if online_pruning is not None:
        masks = online_pruning.step(state.epoch, settings.n_epochs, state.model, posterior)
        if masks is not None and masks is not state.masks:  # a prune: θ moved after the fit
            state.masks = masks
            state.posterior, state.posterior_is_current = None, False
    return marglik
