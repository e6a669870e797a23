"""Online pruning during SpaM training (SPEC §6): a rising OPD target, persistent masks.

``marglik_train(..., online_pruning=OnlinePruning(...))`` calls :meth:`OnlinePruning.step`
right after each marglik step with the epoch just completed (1-based, so the last epoch
is E) and the posterior fitted there. The target is

    s_e = s_0 + (s_end − s_0) · ⌊e / I⌋ / ⌊E / I⌋,

and the step prunes only when ⌊e / I⌋ has grown since the last prune (so a marglik step
more often than every I epochs does not prune twice at one level). New masks are combined
with the old ones (a pruned weight never comes back), applied to the model at once, and
returned; marglik_train enforces them after every later optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spamkern.pruning.masks import PruningMasks, apply_masks, check_sparsity, prune
from spamkern.pruning.scores import opd_scores

__all__ = ["OnlinePruning"]


class OnlinePruning:
    """Schedule s_e from ``initial_sparsity`` (s_0) to ``final_sparsity`` (s_end) every
    ``interval`` (I) epochs, pruning by ``score_fn(posterior)`` (OPD by default)."""

    def __init__(
        self,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        interval: int = 5,
        pattern: str = "unstructured",
        scope: str = "global",
        block: tuple[int, int] = (64, 64),
        prune_output_layer: bool = False,
        prune_1d: bool = False,
        score_fn: Callable[[object], torch.Tensor] = opd_scores,
    ) -> None:
        self.final_sparsity = check_sparsity(final_sparsity)
        self.initial_sparsity = check_sparsity(initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity "
                f"({final_sparsity})"
            )
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive integer (epochs), got {interval!r}")
        self.interval = interval
        self.prune_kwargs = {
            "pattern": pattern,
            "scope": scope,
            "block": block,
            "prune_output_layer": prune_output_layer,
            "prune_1d": prune_1d,
        }
        self.score_fn = score_fn
        self.masks: PruningMasks | None = None
        self.history: list[dict[str, float]] = []
        self._level: int | None = None

    def target(self, epoch: int, n_epochs: int) -> float:
        """s_e of the schedule (capped at s_end)."""
        if n_epochs < 1 or epoch < 0:
            raise ValueError(f"need epoch ≥ 0 and n_epochs ≥ 1, got {epoch} and {n_epochs}")
        steps = n_epochs // self.interval
        if steps == 0:
            return self.final_sparsity
        frac = min(epoch // self.interval, steps) / steps
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * frac

    def step(
        self, epoch: int, n_epochs: int, model: nn.Module, posterior: object
    ) -> PruningMasks | None:
        """Prune to s_e if ⌊e/I⌋ rose since the last prune; return the masks to enforce."""
        level = epoch // self.interval
        if self._level is not None and level <= self._level:
            return self.masks
        self._level = level
        s = self.target(epoch, n_epochs)
        if s == 0.0 and self.masks is None:
            return None
        new = prune(model, self.score_fn(posterior), s, **self.prune_kwargs)
        if self.masks is not None:
            for name, old in self.masks.items():
                new[name] = new[name] & old if name in new else old
        apply_masks(model, new)
        self.masks = new
        self.history.append({"epoch": epoch, "target": s, "achieved": new.sparsity()})
        return new
