"""One training epoch of the SpaM objective at the cost of a plain MAP epoch.

Per batch the objective is  mean loss + (T / 2N) Σ_i δ_i θ_i²  with δ fixed. The prior
term never enters the autograd graph: after the backward of the mean loss its exact
gradient (T/N)·δ∘θ is added to every parameter's gradient in one fused foreach op — or,
when every tensor has the same single δ (a scalar prior, or any prior before its first
update), inside torch's fused Adam/SGD kernel as its L2 ``weight_decay``, with no pass of
its own. Masks are enforced by one fused multiply, and the loss (and, for labels already on an
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
from spamkern.marglik.state import RunSettings, TrainingState
from spamkern.prior.priors import Prior


class PriorGradient:
    """Adds ∇ (T/2N) Σ δ θ² = (T/N)·δ∘θ to the gradients, δ frozen by :meth:`refresh`.

    Tensors with one δ (scalar and layerwise priors) take a fused ``g += c·θ`` per
    distinct δ, which reads a third less memory than the general ``g += c·δ∘θ`` that
    unitwise and parameterwise tensors take. When all of ``params`` share one δ and form
    the single parameter group of ``optimizer``, c is that group's ``weight_decay`` (the
    same L2 gradient, added inside the optimiser's step).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        prior: Prior,
        temperature: float,
        n_data: int,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.params = params
        self.optimizer = optimizer  # its group is read at refresh (a restore replaces it)
        self.prior = prior
        self.scale = temperature / n_data
        # (T/N)·δ → the tensors with that single δ (their indices and themselves)
        self.uniform: dict[float, tuple[list[int], list[nn.Parameter]]] = {}
        self.full: list[int] = []  # tensors with one δ per entry
        self.full_params: list[nn.Parameter] = []
        self.deltas: list[torch.Tensor] = []

    @torch.no_grad()
    def refresh(self) -> None:
        """Take the prior's current precisions (once per epoch: δ is fixed within one)."""
        tps = self.prior.per_tensor()
        single = [i for i, tp in enumerate(tps) if tp.kind == "scalar"]
        values = torch.stack([tps[i].log_delta for i in single]).exp().tolist() if single else []
        by_value: dict[float, list[int]] = {}
        for i, value in zip(single, values):
            by_value.setdefault(value, []).append(i)
        self.uniform = {
            self.scale * value: (group, [self.params[i] for i in group])
            for value, group in by_value.items()
        }
        self.full = [i for i, tp in enumerate(tps) if tp.kind != "scalar"]
        self.full_params = [self.params[i] for i in self.full]
        self.deltas = [tps[i].expand(self.params[i].shape).exp().contiguous() for i in self.full]
        self._to_weight_decay()

    def _to_weight_decay(self) -> None:
        """Hand one shared δ to the optimiser's single group as its weight decay."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        whole = len(groups) == 1 and len(groups[0]["params"]) == len(self.params)
        whole = whole and all(p is q for p, q in zip(groups[0]["params"], self.params))
        if whole and len(self.uniform) == 1 and not self.full:
            groups[0]["weight_decay"] = next(iter(self.uniform))
            self.uniform = {}
        elif whole:
            groups[0]["weight_decay"] = 0.0

    @torch.no_grad()
    def __call__(self) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):  # a tensor the loss does not reach feels the prior
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.params]
        for alpha, (group, params) in self.uniform.items():
            torch._foreach_add_([grads[i] for i in group], params, alpha=alpha)
        if self.full:
            full_grads = [grads[i] for i in self.full]
            torch._foreach_addcmul_(full_grads, self.deltas, self.full_params, value=self.scale)


def make_optimizer(
    params: list[nn.Parameter], name: str, lr: float, momentum: float
) -> torch.optim.Optimizer:
    """Adam or SGD on torch's fused kernels where the parameters' device and dtype have
    them: one pass over each tensor per step instead of one per elementwise op."""
    kind = torch.optim.Adam if name == "adam" else torch.optim.SGD
    options = {"lr": lr} if name == "adam" else {"lr": lr, "momentum": momentum}
    try:
        return kind(params, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device or dtype
        return kind(params, **options)


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
    prior_gradient: PriorGradient,
    enforce_masks: MaskEnforcer,
    labels: LabelRange,
    harvest: EpochHarvest | None = None,
) -> float:
    """One pass of optimiser steps over ``batches``; returns the mean training loss."""
    model, opt, sched = state.model, state.optimizer, state.scheduler
    params = prior_gradient.params
    device = params[0].device
    prior_gradient.refresh()
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
        prior_gradient()
        opt.step()
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
