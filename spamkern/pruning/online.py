"""Online pruning during SpaM training: a rising OPD target, persistent masks.

``marglik_train(..., online_pruning=OnlinePruning(...))`` calls :meth:`OnlinePruning.step`
right after each marglik step with the epoch just completed (1-based, so the last epoch
is E) and the posterior fitted there. The target is

    s_e = s_0 + (s_end − s_0) · ⌊e / I⌋ / ⌊E / I⌋,

and the step prunes only when ⌊e / I⌋ has grown since the last prune (so a marglik step
more often than every I epochs does not prune twice at one level). New masks are combined
with the old ones (a pruned weight never comes back), applied to the model at once, and
returned; marglik_train enforces them after every later optimiser step.

The masks come from the same machinery as :func:`spamkern.sparsify`: ``method`` names a
selection of :data:`~spamkern.pruning.sparsify.SPARSIFY_METHODS` (default: the same
measured default), or ``score_fn(posterior)`` gives scores directly. ``reconstruct``:
``"posterior"`` re-solves the survivors from the posterior's Kronecker factor A at every
prune (data-free, cheap: the optimiser then starts from the best weights for the new
mask instead of relearning them; units are compensated in the next layer), ``"none"``
leaves that to training; ``"auto"`` (default) reconstructs when the posterior has
Kronecker factors. Data-driven reconstruction is not offered here: the next epochs train
on the data anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spamkern.pruning.masks import PruningMasks, apply_masks, check_sparsity, prune
from spamkern.pruning.reconstruct import DEFAULT_DAMPING, reconstruct
from spamkern.pruning.saliency import kron_masks
from spamkern.pruning.scores import posterior_terms
from spamkern.pruning.sparsify import DEFAULT_METHOD, SPARSIFY_METHODS, method_scores

__all__ = ["OnlinePruning"]


class OnlinePruning:
    """Schedule s_e from ``initial_sparsity`` (s_0) to ``final_sparsity`` (s_end) every
    ``interval`` (I) epochs, pruning by ``method`` (or ``score_fn(posterior)``) and
    optionally reconstructing the survivors (see the module docs)."""

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
        score_fn: Callable[[object], torch.Tensor] | None = None,
        method: str | None = None,
        reconstruct: str = "auto",
        damping: float = DEFAULT_DAMPING,
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
        if score_fn is not None and method is not None:
            raise ValueError("pass either score_fn or method, not both")
        method = None if score_fn is not None else (method or DEFAULT_METHOD)
        if method is not None and method not in SPARSIFY_METHODS:
            raise ValueError(f"method must be one of {SPARSIFY_METHODS}, got {method!r}")
        if reconstruct not in ("auto", "none", "posterior"):
            raise ValueError(
                f"reconstruct must be 'auto', 'none' or 'posterior', got {reconstruct!r}"
            )
        self.score_fn = score_fn
        self.method = method
        self.reconstruct = reconstruct
        self.damping = damping
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
        new = self._select(model, posterior, s)
        if self.masks is not None:
            for name, old in self.masks.items():
                new[name] = new[name] & old if name in new else old
        if self._reconstructs(posterior):
            rebuilt = reconstruct(model, new, posterior=posterior, damping=self.damping)
            with torch.no_grad():
                for p, q in zip(model.parameters(), rebuilt.parameters()):
                    p.copy_(q)
        apply_masks(model, new)
        self.masks = new
        self.history.append({"epoch": epoch, "target": s, "achieved": new.sparsity()})
        return new

    def _select(self, model: nn.Module, posterior: object, s: float) -> PruningMasks:
        if self.score_fn is not None:
            return prune(model, self.score_fn(posterior), s, **self.prune_kwargs)
        if self.method == "kron":
            return kron_masks(posterior, s, model=model, **self.prune_kwargs)
        return prune(model, method_scores(self.method, model, posterior), s, **self.prune_kwargs)

    def _reconstructs(self, posterior: object) -> bool:
        if self.reconstruct == "none":
            return False
        has_factors = posterior_terms(posterior).kron_factors is not None
        if self.reconstruct == "posterior" and not has_factors:
            raise ValueError(
                "OnlinePruning(reconstruct='posterior') needs a Kronecker posterior "
                "(structure='kron'); use reconstruct='none' or 'auto'"
            )
        return has_factors
