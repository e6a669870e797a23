"""What a marginal-likelihood run is: fixed settings, and the state a checkpoint restores.

:class:`RunSettings` never changes during a run. :class:`TrainingState` is everything that
does — model, optimisers, scheduler, prior, log σ, masks, history, random states, the
cached data-only input factors — and :meth:`TrainingState.checkpoint` /
:meth:`TrainingState.restore` save and reload all of it, so a resumed run reproduces the
uninterrupted one bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spamkern.curvature.harvest import InputFactors
from spamkern.distributed import all_gather_object, rank
from spamkern.marglik.checkpoint import restore_rng_state, rng_state
from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior.priors import Prior


@dataclass(frozen=True)
class RunSettings:
    """The fixed choices of a run that the epoch and marglik steps need."""

    likelihood: str
    structure: str
    curvature: str
    curvature_source: str  # "epoch" (harvested from the training sweep) or "refit"
    temperature: float
    n_data: int  # global N (summed over ranks)
    n_epochs: int
    dict_key_y: str = "labels"  # where dict batches keep their targets


@dataclass
class TrainingState:
    """The mutable state of a run; ``epoch`` is the last completed epoch (0 before any)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    prior: Prior
    log_sigma: torch.Tensor
    hyper: Any  # the hyperparameter optimiser: .step(posterior), .state_dict()
    generators: dict[str, torch.Generator | None]
    input_factors: InputFactors
    masks: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    posterior: LaplacePosterior | None = None  # not checkpointed: refitted when needed
    posterior_is_current: bool = False  # fitted at the current θ and masks

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint payload (random states gathered from every rank)."""
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "hyper_optimizer": self.hyper.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "prior": self.prior.state_dict(),
            "log_sigma": self.log_sigma.detach(),
            "history": self.history,
            "masks": self.masks,
            "input_factors": self.input_factors.state_dict(),
            "rng": all_gather_object(rng_state(self.generators)),
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Load a :meth:`checkpoint` payload in place."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.hyper.load_state_dict(payload["hyper_optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.prior.load_state_dict(payload["prior"])
        with torch.no_grad():
            self.log_sigma.copy_(payload["log_sigma"])
        self.history = payload["history"]
        self.masks = payload["masks"]
        if "input_factors" in payload:
            self.input_factors.load_state_dict(payload["input_factors"])
        rng = payload["rng"]  # one entry per rank under torch.distributed
        restore_rng_state(rng[rank()] if isinstance(rng, list) else rng, self.generators)
        self.epoch = payload["epoch"]
