"""SpaM training: MAP steps under the current prior, marginal-likelihood steps on the prior.

Per batch: loss = mean loss + (T / 2N) Σ δ_i θ_i² — the log joint scaled by T/N, δ fixed
(:mod:`spamkern.marglik.epoch` applies the prior term without a graph). Every
``marglik_frequency`` epochs once the epoch is ≥ ``n_epochs_burnin``: a Laplace posterior
on the whole training set at the current θ (refitted, or harvested from the epoch's own
training steps), then the hyperparameter update of log δ (and log σ for regression), θ
fixed (:mod:`spamkern.marglik.marglik_step`). Burn-in beyond the last epoch gives the MAP
baseline with δ fixed. :mod:`spamkern.marglik.state` holds what a checkpoint restores.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spamkern.curvature.harvest import (
    EpochHarvest,
    InputFactors,
    check_curvature_source,
)
from spamkern.curvature.structure import parameter_blocks
from spamkern.data.batches import TensorBatches, as_batches, epoch_size, split_batch
from spamkern.distributed import all_reduce_sum, check_same_on_all_ranks, is_distributed, rank
from spamkern.marglik.checkpoint import load_checkpoint, save_checkpoint, should_resume
from spamkern.marglik.epoch import LabelRange, MaskEnforcer, train_epoch
from spamkern.marglik.hyper import DEFAULT_TOL, HYPER_OPTIMIZERS, make_hyper_optimizer
from spamkern.marglik.marglik_step import fit_posterior, marglik_step
from spamkern.marglik.optimizer_step import OptimizerStep, PriorGradient, make_optimizer
from spamkern.marglik.state import RunSettings, TrainingState
from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior.priors import Prior, make_prior
from spamkern.progress import progress_bar
from spamkern.validation import check_marglik_args, check_model_params, check_tensor_data

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", None)
DEFAULT_HYPER_OPTIMIZER = "fixed-point"


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


def _check_schedule(n_epochs, n_epochs_burnin, marglik_frequency, n_hypersteps, lr, lr_hyp):
    if not isinstance(n_epochs, int) or n_epochs < 1:
        raise ValueError(f"n_epochs must be a positive integer, got {n_epochs!r}")
    if n_epochs_burnin < 0:
        raise ValueError(f"n_epochs_burnin must be >= 0, got {n_epochs_burnin}")
    if not isinstance(marglik_frequency, int) or marglik_frequency < 1:
        raise ValueError(f"marglik_frequency must be a positive integer, got {marglik_frequency!r}")
    if n_hypersteps < 0:
        raise ValueError(f"n_hypersteps must be >= 0, got {n_hypersteps}")
    if not (lr >= 0 and lr_hyp > 0):
        raise ValueError(f"need lr >= 0 and lr_hyp > 0, got lr={lr}, lr_hyp={lr_hyp}")


def _check_choices(optimizer, scheduler, hyper_optimizer, resume, checkpoint_path) -> None:
    for name, value, allowed in (
        ("optimizer", optimizer, OPTIMIZERS),
        ("scheduler", scheduler, SCHEDULERS),
        ("hyper_optimizer", hyper_optimizer, HYPER_OPTIMIZERS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")


def _check_hyper_tol(hyper_tol, hyper_optimizer: str) -> float:
    """The fixed-point tolerance to use; refused where it would be ignored (Adam)."""
    if hyper_tol is None:
        return DEFAULT_TOL
    if hyper_optimizer != "fixed-point":
        raise ValueError(
            f"hyper_tol applies to hyper_optimizer='fixed-point' only; {hyper_optimizer!r} "
            "takes n_hypersteps steps at lr_hyp"
        )
    if isinstance(hyper_tol, bool) or not isinstance(hyper_tol, (int, float)):
        raise TypeError(f"hyper_tol must be a number, got {type(hyper_tol).__name__}")
    if not 0 <= hyper_tol < math.inf:
        raise ValueError(f"hyper_tol must be finite and >= 0 (per data point), got {hyper_tol}")
    return float(hyper_tol)


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
    curvature_source: str = "refit",
    hyper_optimizer: str = DEFAULT_HYPER_OPTIMIZER,
    hyper_tol: float | None = None,
    cache_input_factors: bool = True,
) -> MarglikResult:
    """Train ``model`` with Laplace marginal-likelihood prior selection (SpaM).

    ``train_data`` is a DataLoader/iterable of batches or ``(X, y)`` tensors (shuffled and
    batched on the device). ``masks`` (name → bool tensor, True = kept) are enforced after
    every optimiser step; ``online_pruning`` (see :mod:`spamkern.pruning`) updates them after
    each marglik step. With ``checkpoint_path`` a checkpoint is written after every epoch;
    ``resume=True`` continues from it (it must exist) and reproduces the uninterrupted run;
    ``resume="if-exists"`` continues if it exists and starts afresh otherwise.
    ``on_epoch_end(record)`` is called after each epoch (and its checkpoint) with the
    history record, e.g. for logging or early stopping by raising.

    ``curvature_source="epoch"`` (EF and MC-GGN) harvests the marglik step's curvature from
    the training steps of the epoch before it instead of a refit pass (a running estimate
    while θ moves; see :mod:`spamkern.curvature.harvest`). ``hyper_optimizer`` picks the
    hyperparameter update: Adam takes ``n_hypersteps`` steps at ``lr_hyp``; the fixed-point
    update iterates at most ``n_hypersteps`` times and stops once an iteration gains less
    than ``hyper_tol`` log evidence per data point (default 10⁻⁶; a larger one trades a
    little evidence per marglik step for fewer evaluations). ``cache_input_factors``
    computes the Kronecker A of layers fed by the data alone (the first layer) once per run;
    turn it off when the data differ between passes (random augmentation, input dropout).
    The returned posterior is fitted at the final θ and masks when ``fit_final_posterior``
    (without it: the last marglik step's, or None if a prune came after it).
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
    _check_choices(optimizer, scheduler, hyper_optimizer, resume, checkpoint_path)
    hyper_tol = _check_hyper_tol(hyper_tol, hyper_optimizer)
    blocks = parameter_blocks(model, structure)
    check_model_params([b.param for b in blocks], "marglik_train")
    check_curvature_source(curvature_source, curvature, blocks)
    device = blocks[0].param.device
    batch_gen = torch.Generator(device="cpu").manual_seed(seed)
    # MC-GGN draws: independent across ranks (each rank samples labels for its own shard)
    mc_gen = torch.Generator(device=device).manual_seed(seed + 1 + rank())
    batches = as_batches(train_data, batch_size, shuffle=True, generator=batch_gen, device=device)
    check_tensor_data(batches, blocks[0].param.dtype, likelihood)
    n_data, n_steps = _global_size(batches, dict_key_y)
    settings = RunSettings(
        likelihood,
        structure,
        curvature,
        curvature_source,
        temperature,
        n_data,
        n_epochs,
        dict_key_y,
    )
    prior_module = make_prior(
        prior, [(b.name, b.param) for b in blocks], prior_precision, temperature
    )
    log_sigma = torch.tensor(
        math.log(sigma_noise), dtype=blocks[0].param.dtype, device=device, requires_grad=True
    )
    opt = make_optimizer([b.param for b in blocks], optimizer, lr, momentum)
    state = TrainingState(
        model=model,
        optimizer=opt,
        scheduler=_lr_scheduler(opt, scheduler, n_epochs * n_steps),
        prior=prior_module,
        log_sigma=log_sigma,
        hyper=make_hyper_optimizer(
            hyper_optimizer,
            prior_module,
            log_sigma=log_sigma,
            learn_sigma=likelihood == "regression" and learn_sigma,
            lr=lr_hyp,
            n_steps=n_hypersteps,
            tol=hyper_tol,
        ),
        generators={
            "batches": batch_gen,
            "mc": mc_gen,
            "loader": getattr(train_data, "generator", None),
        },
        input_factors=InputFactors(blocks, cache_input_factors and not is_distributed()),
        masks=masks,
    )
    if should_resume(resume, checkpoint_path):
        state.restore(load_checkpoint(checkpoint_path, device, n_epochs))
        if online_pruning is not None:
            online_pruning.masks = state.masks
    loop = _EpochLoop(
        settings,
        state,
        blocks,
        train_data,
        batches,
        as_batches(train_data, batch_size, shuffle=False, device=device),
        mc_gen,
        lambda epoch: is_marglik_epoch(epoch, n_epochs_burnin, marglik_frequency),
        online_pruning,
    )
    _run_epochs(loop, state, n_epochs, progress, checkpoint_path, on_epoch_end)
    return _result(state, settings, loop.fit_batches, mc_gen, fit_final_posterior)


def _global_size(batches, dict_key_y: str) -> tuple[int, int]:
    """(N over all ranks, this rank's optimiser steps per epoch): under torch.distributed
    each rank holds a shard, and the prior term needs the global N."""
    size = epoch_size(batches, dict_key_y)
    n_data, n_steps = size.n_data, size.n_batches
    if is_distributed():
        n_data = int(all_reduce_sum(float(n_data)))
        check_same_on_all_ranks(n_steps, "optimiser steps per epoch")
    return n_data, n_steps


def _lr_scheduler(optimizer: torch.optim.Optimizer, scheduler: str | None, total_steps: int):
    """Cosine decay over every optimiser step of the run, or none."""
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


def _run_epochs(
    loop, state: TrainingState, n_epochs: int, progress: bool, checkpoint_path, on_epoch_end
) -> None:
    """The remaining epochs (all, or those after a resumed checkpoint), each followed by
    its checkpoint and the caller's callback."""
    epochs = range(state.epoch + 1, n_epochs + 1)
    bar = progress_bar(
        epochs, desc="marglik_train", enabled=progress, initial=state.epoch, total=n_epochs
    )
    for epoch in bar:
        record = loop.run(state, epoch)
        bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            marglik="-" if record["marglik"] is None else f"{record['marglik']:.4g}",
        )
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, state.checkpoint())
        if on_epoch_end is not None:
            on_epoch_end(record)


class _EpochLoop:
    """The per-run machinery around the state: one call of :meth:`run` is one epoch —
    the training sweep (harvesting curvature when asked), then the marglik step if due."""

    def __init__(
        self,
        settings: RunSettings,
        state: TrainingState,
        blocks,
        train_data,
        batches,
        fit_batches,
        generator: torch.Generator,
        marglik_due: Callable[[int], bool],
        online_pruning,
    ):
        self.settings, self.blocks, self.train_data = settings, blocks, train_data
        self.batches, self.fit_batches, self.generator = batches, fit_batches, generator
        self.marglik_due, self.online_pruning = marglik_due, online_pruning
        params = [b.param for b in blocks]
        T, N = settings.temperature, settings.n_data
        prior_gradient = PriorGradient(params, state.prior, T, N, state.optimizer)
        self.optimizer_step = OptimizerStep(prior_gradient, state.optimizer)
        self.enforce_masks = MaskEnforcer(state.model, state.masks)
        all_labels = batches.y if isinstance(batches, TensorBatches) else None
        self.labels = LabelRange(settings.likelihood, all_labels)

    def run(self, state: TrainingState, epoch: int) -> dict[str, Any]:
        """Train one epoch, do its marglik step if due; returns its history record."""
        tic = time.perf_counter()
        _set_sampler_epoch(self.train_data, epoch)
        due = self.marglik_due(epoch)
        harvesting = due and self.settings.curvature_source == "epoch"
        harvest = self._harvest(state) if harvesting else None
        with harvest if harvest is not None else contextlib.nullcontext():
            loss = train_epoch(
                state,
                self.settings,
                self.batches,
                self.optimizer_step,
                self.enforce_masks,
                self.labels,
                harvest,
            )
        state.epoch, state.posterior_is_current = epoch, False
        record: dict[str, Any] = {"epoch": epoch, "loss": loss, "marglik": None}
        record["hyper_evaluations"] = 0  # evidence evaluations of the marglik step
        if due:
            self._detect_input_factors(state)
            fit_data, generator = self.fit_batches, self.generator
            posterior = fit_posterior(state, self.settings, fit_data, generator, harvest)
            record["marglik"] = marglik_step(state, self.settings, posterior, self.online_pruning)
            record["hyper_evaluations"] = state.hyper.n_evaluations
            self.enforce_masks = MaskEnforcer(state.model, state.masks)
        _finish_record(record, state, self.settings.likelihood, tic)
        return record

    def _detect_input_factors(self, state: TrainingState) -> None:
        if not state.input_factors.needs_detection:
            return
        x = _first_inputs(self.fit_batches, self.blocks[0].param.device, self.settings.dict_key_y)
        state.input_factors.detect(state.model, x)

    def _harvest(self, state: TrainingState) -> EpochHarvest:
        self._detect_input_factors(state)
        s = self.settings
        given = state.input_factors.given()
        return EpochHarvest(self.blocks, s.curvature, self.generator, given, s.likelihood)


def _finish_record(record: dict[str, Any], state: TrainingState, likelihood: str, tic) -> None:
    state.model.train()
    record["log_prior_precision_mean"] = float(state.prior.log_precision.detach().mean())
    if likelihood == "regression":
        record["sigma"] = float(state.log_sigma.detach().exp())
    record["lr"] = state.optimizer.param_groups[0]["lr"]
    record["time_s"] = time.perf_counter() - tic
    state.history.append(record)


def _result(state, settings, fit_batches, generator, fit_final_posterior) -> MarglikResult:
    """The run's result; its posterior is fitted at the final θ and masks, the last marglik
    step's (when ``fit_final_posterior=False``), or None if a prune came after that step."""
    if fit_final_posterior and not state.posterior_is_current:
        fit_posterior(state, settings, fit_batches, generator)
    state.model.train()
    return MarglikResult(
        state.model,
        state.posterior,
        state.prior,
        state.history,
        state.masks,
        state.log_sigma.detach(),
    )


def _first_inputs(batches, device: torch.device, dict_key_y: str):
    """The inputs of the first batch (to find the layers fed by the data alone)."""
    for batch in batches:
        return split_batch(batch, device, dict_key_y)[0]
    raise ValueError("the training data yielded no batches (empty loader)")


def _set_sampler_epoch(data, epoch: int) -> None:
    sampler = getattr(data, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
