"""Masks from scores: patterns, scopes, exact sparsity, enforcement.

A mask dict maps a parameter name to a bool tensor of that parameter's shape (True =
kept); parameters left out are not pruned. :func:`prune` returns a :class:`PruningMasks`,
a dict that also remembers how it was made, so :func:`spamkern.pruning.compress` knows
what it may shrink.

What "sparsity" counts, per pattern:

* ``unstructured``: entries of the prunable tensors (weights of every layer but the
  output layer; 1-D tensors only with ``prune_1d=True``).
* ``unit``: units of the prunable Linear/Conv2d layers — a unit is one output row of the
  weight (a Conv2d filter) together with its bias entry. Its score is the sum of the
  entries' scores. Units of different layers have different sizes, so the global
  ranking uses the *mean* score per parameter of a unit (sum / size); within one layer
  this is the same order as the sum. At least one unit per layer is always kept (a layer
  with no units would cut the network), so at most n_units − n_layers units go.
  With ``example_inputs`` (or for non-chain models whose input is known) the model is
  traced and a unit is a *coupled group*: channel c of every layer tied to it by residual
  additions, BatchNorm, concatenation, or a whole attention head; its score is the sum
  over all its producer entries, and all of them are masked together (see
  :mod:`spamkern.pruning.groups`). "Layer" above then means a family of groups.
* ``block``: r×c blocks of each prunable weight viewed as (out, in·kh·kw); block score =
  sum. All blocks have r·c entries, so this also counts entries.
* ``2:4``: in every group of 4 consecutive inputs of each output row (never across rows
  or layers) the 2 highest scores are kept; sparsity must be 0.5.

The number removed is round(sparsity · count), exactly: ties at the threshold are broken
by position. Thresholds come from :func:`spamkern.ops.kth_smallest` on the scores' device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spamkern.ops import kth_smallest
from spamkern.pruning.groups import default_inputs, is_plain_chain
from spamkern.pruning.scores import scores_to_dict

__all__ = [
    "PATTERNS",
    "SCOPES",
    "PruningMasks",
    "apply_masks",
    "check_sparsity",
    "mask_sparsity",
    "prunable_layers",
    "prune",
    "sparsity_report",
    "unit_sparsity",
]

PATTERNS = ("unstructured", "unit", "block", "2:4")
SCOPES = ("global", "layerwise")
_LAYER_TYPES = (nn.Linear, nn.Conv2d)


class PruningMasks(dict):
    """name → bool mask (True = kept), plus ``pattern``, ``scope``, ``block``, ``target``."""

    def __init__(
        self,
        masks: dict[str, torch.Tensor] | None = None,
        *,
        pattern: str = "unstructured",
        scope: str = "global",
        block: tuple[int, int] | None = None,
        target: float | None = None,
    ) -> None:
        super().__init__(masks or {})
        self.pattern = pattern
        self.scope = scope
        self.block = block
        self.target = target
        self.unit_fraction: float | None = None  # of coupled groups, when traced

    def sparsity(self) -> float:
        """Achieved sparsity in the pattern's own count (units for ``unit``, else entries)."""
        if self.unit_fraction is not None:
            return self.unit_fraction
        if self.pattern == "unit":
            return unit_sparsity(self)
        return mask_sparsity(self, weights_only=False)


# ---------------------------------------------------------------------------- checks
def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1), or a ValueError saying so."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise TypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return s


def _check_finite(flat: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{what} contain NaN or Inf; scores must be finite to rank them")


# ---------------------------------------------------------------------------- layers
def prunable_layers(
    model: nn.Module, prune_output_layer: bool = False
) -> list[tuple[str, nn.Module]]:
    """(prefix, module) of the Linear/Conv2d layers, in registration order.

    The output layer (the last Linear/Conv2d) is left out unless ``prune_output_layer``.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    if not prune_output_layer and layers:
        layers = layers[:-1]
    return layers


def _pname(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def _output_layer_params(model: nn.Module) -> set[str]:
    layers = [n for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
    if not layers:
        return set()
    return {_pname(layers[-1], "weight"), _pname(layers[-1], "bias")}


# ---------------------------------------------------------------------------- selection
def _lowest_k(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool vector marking exactly the k lowest entries (ties broken by position)."""
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool)
    thr = kth_smallest(flat, k)
    below = flat < thr
    tie = flat == thr
    need = k - below.sum()
    return below | (tie & (tie.cumsum(0) <= need))


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(flat.split(sizes))


# ---------------------------------------------------------------------------- patterns
def _unstructured(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    s: float,
    scope: str,
    prune_output_layer: bool,
    prune_1d: bool,
) -> dict[str, torch.Tensor]:
    excluded = set() if prune_output_layer else _output_layer_params(model)
    names = [
        n
        for n, p in model.named_parameters()
        if n in scores and n not in excluded and (p.ndim >= 2 or (prune_1d and p.ndim == 1))
    ]
    if not names:
        raise ValueError("no prunable tensors: every scored parameter is excluded")
    flats = [scores[n].reshape(-1) for n in names]
    if scope == "global":
        flat = torch.cat(flats)
        _check_finite(flat, "scores")
        pruned = _split(_lowest_k(flat, round(s * flat.numel())), [f.numel() for f in flats])
    else:
        pruned = []
        for n, f in zip(names, flats):
            _check_finite(f, f"scores[{n!r}]")
            pruned.append(_lowest_k(f, round(s * f.numel())))
    return {n: (~m).view_as(scores[n]) for n, m in zip(names, pruned)}


def _scored_layers(
    model: nn.Module, scores: dict[str, torch.Tensor], prune_output_layer: bool
) -> list[tuple[str, nn.Module]]:
    layers = [
        (n, m)
        for n, m in prunable_layers(model, prune_output_layer)
        if _pname(n, "weight") in scores
    ]
    if not layers:
        raise ValueError(
            "no prunable Linear/Conv2d layer has scores (the output layer is excluded unless "
            "prune_output_layer=True)"
        )
    for n, m in layers:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(
                f"layer {n!r}: grouped convolutions (groups={m.groups}) are not supported"
            )
    return layers


def _unit(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    s: float,
    scope: str,
    prune_output_layer: bool,
) -> dict[str, torch.Tensor]:
    layers = _scored_layers(model, scores, prune_output_layer)
    sums, sizes, ranks = [], [], []
    for n, m in layers:
        w = scores[_pname(n, "weight")]
        row = w.reshape(w.shape[0], -1).sum(dim=1)
        size = w[0].numel()
        bname = _pname(n, "bias")
        if m.bias is not None and bname in scores:
            row = row + scores[bname]
            size += 1
        _check_finite(row, f"unit scores of layer {n!r}")
        rank = row / size
        rank = rank.clone()
        rank[rank.argmax()] = math.inf  # the best unit of every layer always stays
        sums.append(row)
        sizes.append(size)
        ranks.append(rank)
    if scope == "global":
        flat = torch.cat(ranks)
        k = min(round(s * flat.numel()), flat.numel() - len(layers))
        pruned = _split(_lowest_k(flat, k), [r.numel() for r in ranks])
    else:
        pruned = [_lowest_k(r, min(round(s * r.numel()), r.numel() - 1)) for r in ranks]
    masks = {}
    for (n, m), p in zip(layers, pruned):
        keep = ~p
        w = m.weight
        masks[_pname(n, "weight")] = keep.view(-1, *([1] * (w.ndim - 1))).expand_as(w).clone()
        if m.bias is not None:
            masks[_pname(n, "bias")] = keep.clone()
    return masks


def _unit_groups(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    s: float,
    scope: str,
    prune_output_layer: bool,
    example_inputs,
) -> tuple[dict[str, torch.Tensor], float]:
    """Unit masks over coupled channel groups traced on ``example_inputs`` (see groups.py),
    and the fraction of units removed."""
    from spamkern.pruning.groups import channel_families, unit_values

    families = [
        f
        for f in channel_families(model, example_inputs)
        if f.reason is None and (prune_output_layer or not f.is_output)
        and any(sl.param in scores for sl in f.producers)
    ]  # fmt: skip
    if not families:
        raise ValueError(
            "no prunable coupled channel group has scores (groups through LayerNorm/"
            "GroupNorm or nn.MultiheadAttention, and the output layer unless "
            "prune_output_layer=True, cannot be removed exactly)"
        )
    ranks = []
    for f in families:
        total, size = unit_values(f, scores)
        rank = total / size.clamp(min=1)
        _check_finite(rank, f"unit scores of the group rooted at {f.root!r}")
        rank[rank.argmax()] = math.inf  # the best unit of every group always stays
        ranks.append(rank)
    if scope == "global":
        flat = torch.cat(ranks)
        k = min(round(s * flat.numel()), flat.numel() - len(families))
        pruned = _split(_lowest_k(flat, k), [r.numel() for r in ranks])
    else:
        pruned = [_lowest_k(r, min(round(s * r.numel()), r.numel() - 1)) for r in ranks]
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for f, p in zip(families, pruned):
        gone = p.repeat_interleave(f.unit)  # per channel
        for sl in f.producers:
            par = params[sl.param]
            m = masks.setdefault(sl.param, torch.ones_like(par, dtype=torch.bool))
            drop = sl.index[gone[sl.root]].to(par.device)
            m.index_fill_(sl.dim, drop, False)
    n_units = sum(r.numel() for r in ranks)
    return masks, sum(int(p.sum()) for p in pruned) / n_units


def _as_2d(name: str, w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _block(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    s: float,
    scope: str,
    block: tuple[int, int],
    prune_output_layer: bool,
) -> dict[str, torch.Tensor]:
    if (
        not isinstance(block, tuple | list)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(f"block must be a pair (r, c) of positive integers, got {block!r}")
    r, c = block
    layers = _scored_layers(model, scores, prune_output_layer)
    grids, shapes = [], []
    for n, _ in layers:
        w2 = _as_2d(n, scores[_pname(n, "weight")])
        o, i = w2.shape
        if o % r or i % c:
            raise ValueError(
                f"block {r}×{c} does not divide the weight of layer {n!r}, viewed as ({o}, {i}) "
                "(out, in·kh·kw); choose block sizes that divide both"
            )
        g = w2.reshape(o // r, r, i // c, c).sum(dim=(1, 3))
        _check_finite(g, f"block scores of layer {n!r}")
        grids.append(g.reshape(-1))
        shapes.append((o // r, i // c))
    if scope == "global":
        flat = torch.cat(grids)
        pruned = _split(_lowest_k(flat, round(s * flat.numel())), [g.numel() for g in grids])
    else:
        pruned = [_lowest_k(g, round(s * g.numel())) for g in grids]
    masks = {}
    for (n, m), p, (bo, bi) in zip(layers, pruned, shapes):
        keep = (~p).view(bo, 1, bi, 1).expand(bo, r, bi, c).reshape(bo * r, bi * c)
        masks[_pname(n, "weight")] = keep.reshape(m.weight.shape).clone()
    return masks


def _two_four(
    model: nn.Module, scores: dict[str, torch.Tensor], prune_output_layer: bool
) -> dict[str, torch.Tensor]:
    layers = _scored_layers(model, scores, prune_output_layer)
    masks = {}
    for n, m in layers:
        w2 = _as_2d(n, scores[_pname(n, "weight")])
        o, i = w2.shape
        if i % 4:
            raise ValueError(
                f"2:4 needs the inputs of layer {n!r} (in·kh·kw = {i}) to be divisible by 4"
            )
        _check_finite(w2, f"scores of layer {n!r}")
        groups = w2.reshape(o, i // 4, 4)
        top = groups.topk(2, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        masks[_pname(n, "weight")] = keep.reshape(m.weight.shape)
    return masks


def prune(
    model: nn.Module,
    scores: torch.Tensor | dict[str, torch.Tensor],
    sparsity: float,
    pattern: str = "unstructured",
    scope: str = "global",
    block: tuple[int, int] = (64, 64),
    prune_output_layer: bool = False,
    prune_1d: bool = False,
    example_inputs: torch.Tensor | tuple | None = None,
) -> PruningMasks:
    """Masks that remove the lowest-scoring ``sparsity`` fraction (see the module docs).

    ``scores`` is a (P,) vector aligned with ``model.parameters()`` or a dict name →
    tensor; the model itself is not modified (use :func:`apply_masks`).
    ``example_inputs`` (a batch the model accepts) lets ``pattern="unit"`` trace the
    model and rank whole coupled groups of channels (residual models, transformers).
    Without it, models other than plain Sequential chains are traced on a random batch
    when their input is known (:func:`spamkern.pruning.groups.default_inputs`).
    """
    s = check_sparsity(sparsity)
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    sd = {k: v.detach() for k, v in scores_to_dict(model, scores).items()}
    if pattern == "unit" and example_inputs is None and not is_plain_chain(model):
        example_inputs = default_inputs(model)
    if pattern == "unit" and example_inputs is not None:
        masks, fraction = _unit_groups(model, sd, s, scope, prune_output_layer, example_inputs)
        out = PruningMasks(masks, pattern=pattern, scope=scope, target=s)
        out.unit_fraction = fraction
        return out
    if pattern == "unstructured":
        masks = _unstructured(model, sd, s, scope, prune_output_layer, prune_1d)
    elif pattern == "unit":
        masks = _unit(model, sd, s, scope, prune_output_layer)
    elif pattern == "block":
        masks = _block(model, sd, s, scope, tuple(block), prune_output_layer)
    else:
        if s != 0.5:
            raise ValueError(
                f"the 2:4 pattern always removes half the weights; pass sparsity=0.5, got {s}"
            )
        masks = _two_four(model, sd, prune_output_layer)
    return PruningMasks(
        masks,
        pattern=pattern,
        scope=scope,
        block=tuple(block) if pattern == "block" else None,
        target=s,
    )


# ---------------------------------------------------------------------------- enforcement
@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> nn.Module:
    """Zero the masked entries of ``model``'s parameters in place; returns the model."""
    if not masks:
        return model
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params.get(name)
        if p is None:
            raise ValueError(f"mask for {name!r}, which is not a parameter of the model")
        if m.shape != p.shape or m.dtype != torch.bool:
            raise ValueError(
                f"mask for {name!r} must be a bool tensor of shape {tuple(p.shape)}, got "
                f"{m.dtype} {tuple(m.shape)}"
            )
        p.masked_fill_(~m.to(p.device), 0)
    return model


# ---------------------------------------------------------------------------- accounting
def mask_sparsity(masks: dict[str, torch.Tensor], weights_only: bool = False) -> float:
    """Fraction of masked-out entries over all masked tensors (or only tensors of ≥ 2 dims)."""
    items = [m for m in masks.values() if not weights_only or m.ndim >= 2]
    total = sum(m.numel() for m in items)
    if total == 0:
        return 0.0
    kept = sum(int(m.sum()) for m in items)
    return 1.0 - kept / total


def unit_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of removed units (weight rows that are entirely masked out)."""
    removed = total = 0
    for m in masks.values():
        if m.ndim < 2:
            continue
        rows = m.reshape(m.shape[0], -1).any(dim=1)
        removed += int((~rows).sum())
        total += rows.numel()
    return removed / total if total else 0.0


def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Kept/total parameters of the whole model and the fraction of zeros after masking."""
    total = kept = 0
    for name, p in model.named_parameters():
        total += p.numel()
        kept += int(masks[name].sum()) if name in masks else p.numel()
    return {
        "params_total": float(total),
        "params_kept": float(kept),
        "model_sparsity": 1.0 - kept / total if total else 0.0,
    }
