"""One training epoch of the SpaM objective at the cost of a plain MAP epoch.

Per batch the objective is  mean loss + (T / 2N) Σ_i δ_i θ_i²  with δ fixed. The prior
term never enters the autograd graph: its exact gradient (T/N)·δ∘θ is applied by the
optimiser step (:mod:`spamkern.marglik.optimizer_step`: inside torch's fused Adam kernel as
its weight decay where a tensor has one δ, one fused foreach op where it has one per entry).
Masks are enforced by one fused multiply, and the loss (and, for labels already on an
accelerator, their range) are checked once per epoch on device accumulators — no host
synchronisation per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spamkern.curvature.harvest import EpochHarvest
from spamkern.curvature.likelihood import check_label_range, check_targets, mean_loss
from spamkern.data.batches import split_batch
from spamkern.distributed import all_reduce_gradients, is_distributed
from spamkern.marglik.optimizer_step import OptimizerStep
from spamkern.marglik.state import RunSettings, TrainingState


class MaskEnforcer:
    """Zeroes the masked entries of the parameters with one fused multiply per step."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None):
        from spamkern.pruning.masks import apply_masks

        apply_masks(model, masks)  # validates names, shapes and dtypes once
        named = dict(model.named_parameters())
        self.params = [named[name] for name in masks or {}]
        self.keep = [m.to(named[n].device, named[n].dtype) for n, m in (masks or {}).items()]

    @torch.no_grad()
    def __call__(self) -> None:
        if self.params:
            torch._foreach_mul_(self.params, self.keep)


class LabelRange:
    """Label-range checks without a host sync per step. In-memory labels (``all_labels``)
    are checked once, at the first step; labels on the CPU as they come (no device
    involved); labels on an accelerator are reduced on the device and checked at the end
    of the epoch."""

    def __init__(self, likelihood: str, all_labels: torch.Tensor | None = None):
        self.active = likelihood == "classification"
        self.all_labels = all_labels
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.n_classes = 0

    def __call__(self, y: torch.Tensor, n_classes: int) -> None:
        if not self.active:
            return
        if self.all_labels is not None:
            check_label_range(self.all_labels, n_classes)
            self.active = False
            return
        self.n_classes = n_classes
        if y.device.type == "cpu":
            check_label_range(y, n_classes)
            return
        low, high = y.min(), y.max()
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def finish(self) -> None:
        if self.low is not None:
            check_label_range(torch.stack([self.low, self.high]), self.n_classes)
            self.low = self.high = None


def train_epoch(
    state: TrainingState,
    settings: RunSettings,
    batches,
    optimizer_step: OptimizerStep,
    enforce_masks: MaskEnforcer,
    labels: LabelRange,
    harvest: EpochHarvest | None = None,
) -> float:
    """One pass of optimiser steps over ``batches``; returns the mean training loss."""
    model, opt, sched = state.model, state.optimizer, state.scheduler
    params = optimizer_step.prior_gradient.params
    device = params[0].device
    optimizer_step.refresh()
    regression = settings.likelihood == "regression"
    classification = not regression
    distributed = is_distributed()
    noise = torch.exp(-2.0 * state.log_sigma.detach()) if regression else None
    noise_value = float(noise) if regression else 1.0
    losses, sizes = [], []  # summed on the device once per epoch, no host sync per step
    model.train()
    for batch in batches:
        x, y = split_batch(batch, device, settings.dict_key_y)
        opt.zero_grad(set_to_none=True)
        f = model(x)
        check_targets(settings.likelihood, f, y, check_range=False)
        labels(y, f.shape[-1])
        raw = F.cross_entropy(f, y) if classification else mean_loss(settings.likelihood, f, y)
        loss = raw * noise if regression else raw
        if harvest is not None:
            harvest.before_backward(f, y)
        loss.backward()
        if harvest is not None:
            harvest.after_backward(f, raw.detach() * f.shape[0], f.shape[0] / noise_value)
        if distributed:
            all_reduce_gradients(params, weight=f.shape[0])  # exact for unequal shards
        optimizer_step()
        if sched is not None:
            sched.step()
        enforce_masks()
        losses.append(loss.detach())
        sizes.append(f.shape[0])
    labels.finish()
    if not losses:
        raise ValueError(f"the training data yielded no batches in epoch {state.epoch + 1}")
    weights = torch.tensor(sizes, dtype=losses[0].dtype, device=device)
    loss_sum = (torch.stack(losses) * weights).sum()
    if not bool(torch.isfinite(loss_sum)):
        raise ValueError(
            f"the training loss became {float(loss_sum)} in epoch {state.epoch + 1}; lower the "
            "learning rate or check the data"
        )
    return float(loss_sum) / sum(sizes)
