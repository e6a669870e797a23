"""``sparsify``: the library's best one-shot pruning in one call.

A method is a mask selection (which weights go) and a reconstruction (what the survivors
become). Selections, :data:`SPARSIFY_METHODS`:

* ``"opd"``: ½ θ² Π_ii (the diagonal of the posterior precision);
* ``"obs"``: ½ θ² / [Π⁻¹]_ii (OBS saliency from the posterior covariance diagonal);
* ``"prior"``: ½ δ θ² (the learned prior alone);
* ``"kron"``: the Kronecker cost ½ Δᵀ Π Δ with its cross terms, grown in rounds;
* ``"magnitude"``: |θ| (needs no posterior: the MAP baseline).

Reconstructions, :data:`RECONSTRUCTIONS`: ``"none"`` (masked weights only),
``"posterior"`` (survivors re-solved with the posterior's Kronecker factors A, data-free),
``"data"`` (re-solved layer by layer on the pruned network's own inputs from ``data``),
``"auto"`` (``"data"`` when data is given, else ``"posterior"`` when the posterior has
Kronecker factors, else ``"none"``; the result records what ran).

For ``pattern="unit"`` reconstruction means compensating each pruned layer's *next* layer
(:func:`~spamkern.pruning.reconstruct.compensate_units`): in a plain ``nn.Sequential``
chain the next layer in order, in any other model (traced on ``example_inputs``) the one
Linear/Conv2d that alone reads the removed channels. Units of channels that a residual sum
carries, or of the output layer, have no such reader; they are only removed, and
``result.uncompensated`` names the first layer of each such group.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from spamkern.pruning.compress import compress
from spamkern.pruning.masks import (
    PATTERNS,
    SCOPES,
    PruningMasks,
    apply_masks,
    check_sparsity,
    prune,
)
from spamkern.pruning.reconstruct import DEFAULT_DAMPING
from spamkern.pruning.reconstruct import reconstruct as reconstruct_model
from spamkern.pruning.saliency import kron_masks, obs_scores, prior_scores
from spamkern.pruning.scores import magnitude_scores, opd_scores, posterior_terms

__all__ = [
    "DEFAULT_METHOD",
    "RECONSTRUCTIONS",
    "SPARSIFY_METHODS",
    "SparsifyResult",
    "method_scores",
    "sparsify",
]

SPARSIFY_METHODS = ("opd", "obs", "prior", "kron", "magnitude")
RECONSTRUCTIONS = ("auto", "none", "posterior", "data")
# chosen by measurement (docs/pruning.md, "Which to use"): over the main job's levels (20–99 %,
# three data sets, three seeds) the Kronecker-aware selection had the best mean because it
# never emptied a layer; OPD with reconstruction was as good or better at 80–95 % / 40–60 %
DEFAULT_METHOD = "kron"


@dataclass
class SparsifyResult:
    """``model``: the new pruned (and reconstructed; for units compressed) module;
    ``masks``: what was removed; ``method``/``reconstruct``: what actually ran;
    ``uncompensated``: for units, the pruned layers whose removal no next layer could
    absorb (residual streams, the output layer), empty otherwise."""

    model: nn.Module
    masks: PruningMasks
    method: str
    reconstruct: str
    uncompensated: tuple[str, ...] = ()  # unit-pruned layers with no next layer to re-fit


def method_scores(
    method: str, model: nn.Module, posterior: object | None
) -> dict[str, torch.Tensor]:
    """Scores (name → tensor, lowest pruned first) of a score-based selection method."""
    if method == "magnitude":
        return magnitude_scores(model, as_dict=True)
    if posterior is None:
        raise ValueError(f"method {method!r} reads the posterior; pass one (or 'magnitude')")
    fn = {"opd": opd_scores, "obs": obs_scores, "prior": prior_scores}.get(method)
    if fn is None:
        raise ValueError(f"no score for method {method!r}; score methods: opd, obs, prior")
    return fn(posterior, as_dict=True)


def _resolve_reconstruct(mode: str, posterior: object | None, data) -> str:
    if mode not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruct must be one of {RECONSTRUCTIONS}, got {mode!r}")
    if mode == "data" and data is None:
        raise ValueError("reconstruct='data' needs data (inputs; labels are not used)")
    if mode != "auto":
        return mode
    if data is not None:
        return "data"
    if posterior is not None and posterior_terms(posterior).kron_factors is not None:
        return "posterior"
    return "none"


def sparsify(
    model: nn.Module,
    posterior: object | None,
    sparsity: float,
    pattern: str = "unstructured",
    scope: str = "global",
    method: str | None = None,
    data=None,
    example_inputs=None,
    *,
    reconstruct: str = "auto",
    damping: float | str = DEFAULT_DAMPING,
    block: tuple[int, int] = (64, 64),
    prune_output_layer: bool = False,
    rounds: int = 8,
    batch_size: int = 256,
) -> SparsifyResult:
    """Prune ``model`` to ``sparsity`` and rebuild what survives (see the module docs).

    ``model`` is not modified; ``result.model`` is a new module with the pruned entries at
    zero (for ``pattern="unit"`` the compressed, smaller model). ``method=None`` uses
    :data:`DEFAULT_METHOD` (``"obs"`` for posteriors with a dense curvature matrix).
    ``data`` (inputs or (X, y) or batches; labels unused) enables layer-by-layer
    reconstruction on the pruned network's own inputs. ``example_inputs`` is passed to
    :func:`prune`/:func:`compress` for models that need a traced graph.
    """
    s = check_sparsity(sparsity)
    if method is None:  # a dense-curvature posterior has no block form for 'kron'
        dense = posterior is not None and posterior_terms(posterior).dense_curvature
        method = "obs" if dense else DEFAULT_METHOD
    if method not in SPARSIFY_METHODS:
        raise ValueError(f"method must be one of {SPARSIFY_METHODS} or None, got {method!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mode = _resolve_reconstruct(reconstruct, posterior, data)
    if mode == "posterior" and posterior is None:
        raise ValueError("reconstruct='posterior' needs a posterior with Kronecker factors")
    extra = {} if example_inputs is None else {"example_inputs": example_inputs}
    kwargs = {
        "pattern": pattern,
        "scope": scope,
        "block": block,
        "prune_output_layer": prune_output_layer,
    }
    if method == "kron":
        if posterior is None:
            raise ValueError("method 'kron' reads the posterior's Kronecker factors; pass one")
        masks = kron_masks(posterior, s, rounds=rounds, model=model, **kwargs, **extra)
    else:
        masks = prune(model, method_scores(method, model, posterior), s, **kwargs, **extra)
    skipped: list[str] = []
    if mode == "none":
        new = apply_masks(copy.deepcopy(model), masks)
    else:
        new = reconstruct_model(
            model,
            masks,
            posterior=posterior,
            data=data if mode == "data" else None,
            damping=damping,
            batch_size=batch_size,
            skipped=skipped,
            **extra,
        )
    if pattern == "unit":
        new = compress(new, masks, **extra)
    return SparsifyResult(new, masks, method, mode, tuple(skipped))
