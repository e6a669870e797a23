"""SpaM training: MAP steps under the current prior, marginal-likelihood steps on the prior.

Per batch (SPEC §5): loss = mean loss + (T / 2N) Σ δ_i θ_i² — the log joint scaled by T/N,
δ fixed. Every ``marglik_frequency`` epochs once the epoch is ≥ ``n_epochs_burnin``: fit the
Laplace posterior on the whole training set at the current θ, then ``n_hypersteps`` Adam
steps on −log p(D | δ)/N w.r.t. log δ (and log σ for regression), θ fixed. Burn-in beyond
the last epoch gives the MAP baseline with δ fixed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spamkern.curvature.likelihood import check_label_range, check_targets, mean_loss
from spamkern.curvature.structure import parameter_blocks
from spamkern.data.batches import (
    TensorBatches,
    as_batches,
    check_epoch_samples,
    epoch_size,
    split_batch,
)
from spamkern.distributed import (
    all_gather_object,
    all_reduce_gradients,
    all_reduce_sum,
    check_same_on_all_ranks,
    is_distributed,
    rank,
)
from spamkern.marglik.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    should_resume,
)
from spamkern.posterior.fit import fit_laplace
from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior.priors import Prior, make_prior
from spamkern.progress import progress_bar
from spamkern.validation import check_marglik_args, check_model_params, check_tensor_data

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", None)


@dataclass
class MarglikResult:
    """What a run leaves behind: the trained model, its posterior and prior, the history."""

    model: nn.Module
    posterior: LaplacePosterior | None
    prior: Prior
    history: list[dict[str, Any]] = field(default_factory=list)
    masks: dict[str, torch.Tensor] | None = None
    log_sigma: torch.Tensor | None = None

    @property
    def marglik(self) -> list[float]:
        """Log marginal likelihood after each marglik step, in order."""
        return [h["marglik"] for h in self.history if h["marglik"] is not None]


def _apply_masks(model: nn.Module, masks) -> None:
    from spamkern.pruning.masks import apply_masks

    apply_masks(model, masks)


def _check_schedule(n_epochs, n_epochs_burnin, marglik_frequency, n_hypersteps, lr, lr_hyp):
    if not isinstance(n_epochs, int) or n_epochs < 1:
        raise ValueError(f"n_epochs must be a positive integer, got {n_epochs!r}")
    if n_epochs_burnin < 0:
        raise ValueError(f"n_epochs_burnin must be >= 0, got {n_epochs_burnin}")
    if not isinstance(marglik_frequency, int) or marglik_frequency < 1:
        raise ValueError(f"marglik_frequency must be a positive integer, got {marglik_frequency!r}")
    if n_hypersteps < 0:
        raise ValueError(f"n_hypersteps must be >= 0, got {n_hypersteps}")
    if not (lr > 0 and lr_hyp > 0):
        raise ValueError(f"learning rates must be > 0, got lr={lr}, lr_hyp={lr_hyp}")


def is_marglik_epoch(epoch: int, n_epochs_burnin: int, marglik_frequency: int) -> bool:
    """Epochs (1-based) at which the posterior is fitted and the prior updated."""
    return epoch >= n_epochs_burnin and epoch % marglik_frequency == 0


def marglik_train(
    model: nn.Module,
    train_data,
    *,
    likelihood: str = "classification",
    n_epochs: int = 100,
    structure: str = "kron",
    curvature: str = "ggn",
    prior: str = "layerwise",
    prior_precision=1.0,
    temperature: float = 1.0,
    sigma_noise: float = 1.0,
    learn_sigma: bool = True,
    n_epochs_burnin: int = 0,
    marglik_frequency: int = 1,
    n_hypersteps: int = 100,
    lr: float = 1e-3,
    lr_hyp: float = 0.1,
    optimizer: str = "adam",
    momentum: float = 0.9,
    scheduler: str | None = "cosine",
    batch_size: int | None = None,
    online_pruning=None,
    masks: dict[str, torch.Tensor] | None = None,
    fit_final_posterior: bool = True,
    progress: bool = True,
    seed: int = 0,
    checkpoint_path: str | None = None,
    resume: bool | str = False,
    dict_key_y: str = "labels",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> MarglikResult:
    """Train ``model`` with Laplace marginal-likelihood prior selection (SpaM, SPEC §5).

    ``train_data`` is a DataLoader/iterable of batches or ``(X, y)`` tensors (shuffled and
    batched on the device). ``masks`` (name → bool tensor, True = kept) are enforced after
    every optimiser step; ``online_pruning`` (see :mod:`spamkern.pruning`) updates them after
    each marglik step. With ``checkpoint_path`` a checkpoint is written after every epoch;
    ``resume=True`` continues from it (it must exist) and reproduces the uninterrupted run;
    ``resume="if-exists"`` continues if it exists and starts afresh otherwise.
    ``on_epoch_end(record)`` is called after each epoch (and its checkpoint) with the
    history record, e.g. for logging or early stopping by raising.
    """
    check_marglik_args(
        n_epochs=n_epochs,
        marglik_frequency=marglik_frequency,
        likelihood=likelihood,
        curvature=curvature,
        sigma_noise=sigma_noise,
        temperature=temperature,
        n_epochs_burnin=n_epochs_burnin,
        n_hypersteps=n_hypersteps,
        lr=lr,
        lr_hyp=lr_hyp,
        momentum=momentum,
        seed=seed,
    )
    _check_schedule(n_epochs, n_epochs_burnin, marglik_frequency, n_hypersteps, lr, lr_hyp)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")
    blocks = parameter_blocks(model, structure)
    check_model_params([b.param for b in blocks], "marglik_train")
    device, dtype = blocks[0].param.device, blocks[0].param.dtype
    params = [b.param for b in blocks]
    sizes = [p.numel() for p in params]
    batch_gen = torch.Generator(device="cpu").manual_seed(seed)
    # MC-GGN draws: independent across ranks (each rank samples labels for its own shard)
    mc_gen = torch.Generator(device=device).manual_seed(seed + 1 + rank())
    batches = as_batches(train_data, batch_size, shuffle=True, generator=batch_gen, device=device)
    fit_batches = as_batches(train_data, batch_size, shuffle=False, device=device)
    check_tensor_data(batches, dtype, likelihood)
    size = epoch_size(batches, dict_key_y)  # this rank's samples and steps per epoch
    n_data = size.n_data
    # in-memory labels get one range check (first step) instead of a device sync per step
    labels_prechecked = isinstance(batches, TensorBatches) and likelihood == "classification"
    labels_checked = not labels_prechecked
    if is_distributed():  # each rank holds a shard: the prior term needs the global N
        n_data = int(all_reduce_sum(float(n_data)))
    n_steps_per_epoch = size.n_batches
    if is_distributed():
        check_same_on_all_ranks(n_steps_per_epoch, "optimiser steps per epoch")

    prior_module = make_prior(
        prior, [(b.name, b.param) for b in blocks], prior_precision, temperature
    )
    log_sigma = torch.tensor(math.log(sigma_noise), dtype=dtype, device=device, requires_grad=True)
    hyper_params = [prior_module.log_precision]
    if likelihood == "regression" and learn_sigma:
        hyper_params.append(log_sigma)
    hyper_opt = torch.optim.Adam(hyper_params, lr=lr_hyp)
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    sched = None
    if scheduler == "cosine":
        total = n_epochs * (n_steps_per_epoch or 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

    def refit() -> LaplacePosterior:
        """The posterior on the whole training set at the current θ, under the live prior."""
        return fit_laplace(
            model,
            fit_batches,
            likelihood=likelihood,
            structure=structure,
            curvature=curvature,
            prior=prior_module,
            temperature=temperature,
            sigma_noise=float(log_sigma.detach().exp()),
            generator=mc_gen,
            dict_key_y=dict_key_y,
            progress=False,
        )

    history: list[dict[str, Any]] = []
    posterior: LaplacePosterior | None = None
    start_epoch = 1
    generators = {
        "batches": batch_gen,
        "mc": mc_gen,
        "loader": getattr(train_data, "generator", None),
    }
    if should_resume(resume, checkpoint_path):
        state = load_checkpoint(checkpoint_path, device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        hyper_opt.load_state_dict(state["hyper_optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        prior_module.load_state_dict(state["prior"])
        with torch.no_grad():
            log_sigma.copy_(state["log_sigma"])
        history = state["history"]
        masks = state["masks"]
        if online_pruning is not None:
            online_pruning.masks = masks
        rng = state["rng"]  # one entry per rank under torch.distributed
        restore_rng_state(rng[rank()] if isinstance(rng, list) else rng, generators)
        start_epoch = state["epoch"] + 1
    if masks is not None:
        _apply_masks(model, masks)

    epochs = progress_bar(
        range(start_epoch, n_epochs + 1),
        desc="marglik_train",
        enabled=progress,
        initial=start_epoch - 1,
        total=n_epochs,
    )
    for epoch in epochs:
        tic = time.perf_counter()
        model.train()
        _set_sampler_epoch(train_data, epoch)
        # δ fixed during the epoch, split per tensor so the prior term needs no θ copy
        deltas = [
            d.view_as(p)
            for d, p in zip(prior_module.precision_diag().detach().split(sizes), params)
        ]
        scale = temperature / (2.0 * n_data)
        epoch_loss = torch.zeros((), dtype=dtype, device=device)  # summed on the device:
        seen = 0  # no host sync per step
        for batch in batches:
            x, y = split_batch(batch, device, dict_key_y)
            opt.zero_grad(set_to_none=True)
            f = model(x)
            if not labels_checked:
                check_label_range(batches.y, f.shape[-1])
                labels_checked = True
            check_targets(likelihood, f, y, check_range=not labels_prechecked)
            data_loss = mean_loss(likelihood, f, y)
            if likelihood == "regression":
                data_loss = data_loss * torch.exp(-2.0 * log_sigma.detach())
            penalty = sum((d * p.square()).sum() for d, p in zip(deltas, params))
            loss = data_loss + scale * penalty
            loss.backward()
            if is_distributed():
                all_reduce_gradients(params, weight=f.shape[0])  # exact for unequal shards
            opt.step()
            if sched is not None:
                sched.step()
            if masks is not None:
                _apply_masks(model, masks)
            epoch_loss += data_loss.detach() * f.shape[0]
            seen += f.shape[0]
        check_epoch_samples(seen, size.n_data, epoch)
        if not bool(torch.isfinite(epoch_loss)):
            raise ValueError(
                f"the training loss became {float(epoch_loss)} in epoch {epoch}; lower the "
                "learning rate or check the data"
            )

        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(epoch_loss) / max(seen, 1),
            "marglik": None,
        }
        if is_marglik_epoch(epoch, n_epochs_burnin, marglik_frequency):
            posterior = refit()
            marglik = _hypersteps(
                posterior,
                hyper_opt,
                prior_module,
                log_sigma,
                n_hypersteps,
                likelihood == "regression" and learn_sigma,
            )
            posterior.log_sigma = log_sigma.detach().clone()
            record["marglik"] = marglik
            if online_pruning is not None:
                masks = online_pruning.step(epoch, n_epochs, model, posterior)
                if masks is not None:
                    _apply_masks(model, masks)
        model.train()
        record["log_prior_precision_mean"] = float(prior_module.log_precision.detach().mean())
        if likelihood == "regression":
            record["sigma"] = float(log_sigma.detach().exp())
        record["lr"] = opt.param_groups[0]["lr"]
        record["time_s"] = time.perf_counter() - tic
        history.append(record)
        epochs.set_postfix(
            loss=f"{record['loss']:.4f}",
            marglik="-" if record["marglik"] is None else f"{record['marglik']:.4g}",
        )
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path,
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "hyper_optimizer": hyper_opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "prior": prior_module.state_dict(),
                    "log_sigma": log_sigma.detach(),
                    "history": history,
                    "masks": masks,
                    "rng": all_gather_object(rng_state(generators)),
                },
            )
        if on_epoch_end is not None:
            on_epoch_end(record)

    if fit_final_posterior and (posterior is None or history[-1]["marglik"] is None):
        posterior = refit()
    model.train()
    return MarglikResult(model, posterior, prior_module, history, masks, log_sigma.detach())


def _hypersteps(posterior, hyper_opt, prior_module, log_sigma, n_steps, learn_sigma) -> float:
    """Adam steps on −log p(D | δ)/N; returns the log marginal likelihood at the end."""
    n = posterior.n_data
    for _ in range(n_steps):
        hyper_opt.zero_grad(set_to_none=True)
        value = posterior._log_marglik(
            prior_module.log_precision, log_sigma if learn_sigma else None
        )
        (-value / n).backward()
        hyper_opt.step()
    with torch.no_grad():
        value = posterior._log_marglik(
            prior_module.log_precision, log_sigma if learn_sigma else None
        )
    if not torch.isfinite(value) or not bool(torch.isfinite(prior_module.log_precision).all()):
        raise ValueError(
            "the marginal likelihood or the prior precisions became non-finite during the "
            "hypersteps; lower lr_hyp or n_hypersteps"
        )
    return float(value)


def _set_sampler_epoch(data, epoch: int) -> None:
    sampler = getattr(data, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
