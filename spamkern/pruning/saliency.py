"""Pruning scores that read more of the posterior than its diagonal.

With the Laplace posterior N(θ*, Π⁻¹), Π = s·H + diag(δ), removing a set of entries
(Δ = −θ on them, 0 elsewhere) raises the negative log joint by, to second order,

    c(M) = ½ Δᵀ Π Δ.

* OPD (:func:`~spamkern.pruning.scores.opd_scores`) keeps the diagonal of this form:
  ½ θ_i² Π_ii, the cost of removing i with everything else fixed.
* OBS saliency (:func:`obs_scores`): ½ θ_i² / [Π⁻¹]_ii, the cost of removing i when the
  other weights of the block move to their best values (θ_i / √[Π⁻¹]_ii is the posterior
  signal-to-noise ratio of the weight).
* prior score (:func:`prior_scores`): ½ δ_i θ_i², the learned prior's term alone.
* Kronecker-aware selection (:func:`kron_masks`): for a weight with Π_W = s·G⊗A + D
  (vec row-major) the cost is ½ s·tr(G Δ A Δᵀ) + ½ Σ δ_ij Δ_ij². When A = E[a aᵀ] has a
  large mean part (ReLU or pooling inputs), many same-sign removals in one row add up —
  the cross terms OPD drops. The selection grows the pruned set in rounds; each round
  ranks the entries by their marginal cost given what is already removed,

      c(Δ + e_ij Δ_ij) − c(Δ) = s(Δ_ij R_ij + ½ G_ii A_jj Δ_ij²) + ½ δ_ij Δ_ij²,  R = G Δ A,

  the cheaper of this and OPD's mask is kept (so it is never costlier than OPD on c),
  and for unstructured masks a local search then exchanges removed and kept entries
  while c(M) drops. :func:`kron_cost` evaluates c(M) for any masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spamkern.pruning.groups import ChannelFamily
from spamkern.pruning.masks import PruningMasks, check_sparsity, prunable_layers, prune
from spamkern.pruning.scores import (
    PosteriorTerms,
    _to_output,
    opd_scores,
    posterior_terms,
)

__all__ = ["kron_cost", "kron_masks", "obs_scores", "prior_scores"]


def _checked_terms(posterior: object) -> PosteriorTerms:
    t = posterior_terms(posterior)
    n_params = sum(p.numel() for _, p in t.named_params)
    if t.mean.numel() != n_params:
        raise ValueError(
            f"posterior mean has {t.mean.numel()} entries but its parameters hold {n_params}"
        )
    return t


def obs_scores(posterior: object, as_dict: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """OBS saliency ½ θ_i² / [Π⁻¹]_ii from the posterior covariance diagonal.

    Works for every posterior that provides diag Π⁻¹ (spamkern's for every prior and
    structure; laplace-torch's through their ``posterior_variance``).
    """
    t = _checked_terms(posterior)
    if t.covariance_diag is None:
        raise TypeError(
            f"obs_scores needs the posterior covariance diagonal, which a "
            f"{type(posterior).__name__} does not provide (spamkern.fit_laplace posteriors "
            "and laplace-torch Kron/Diag/FullLaplace do); use opd_scores or prior_scores"
        )
    var = t.covariance_diag().detach().to(t.mean.dtype).reshape(-1)
    if var.numel() != t.mean.numel():
        raise ValueError(
            f"the covariance diagonal has {var.numel()} entries, the posterior {t.mean.numel()}"
        )
    return _to_output(t.named_params, 0.5 * t.mean.square() / var, as_dict)


def prior_scores(
    posterior: object, as_dict: bool = False
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The prior's term ½ δ_i θ_i² (the learned prior precision, no curvature)."""
    t = _checked_terms(posterior)
    prior = t.prior_diag.to(t.mean.dtype).expand_as(t.mean)
    if not bool(prior.any()):
        raise ValueError(
            "the posterior reports no prior precision (all zeros); prior_scores needs one"
        )
    return _to_output(t.named_params, 0.5 * prior * t.mean.square(), as_dict)


# ---------------------------------------------------------------------------- c(M)
def _block_terms(posterior: object) -> PosteriorTerms:
    """Terms of a posterior whose precision is block-diagonal in the forms c(M) reads."""
    t = _checked_terms(posterior)
    if t.dense_curvature:
        raise ValueError(
            f"the Kronecker cost reads Kronecker or diagonal blocks; a "
            f"{type(posterior).__name__} has a dense curvature matrix — use method 'obs' "
            "(its covariance diagonal is exact) or fit a Kron/Diag posterior"
        )
    return t


def _blocks(t: PosteriorTerms):
    """Per tensor: (name, θ as a (p, q) matrix, δ (p, q), factors or None, h (p, q))."""
    offset = 0
    for index, (name, p) in enumerate(t.named_params):
        n = p.numel()
        shape = (p.shape[0], n // p.shape[0]) if p.ndim >= 2 else (n, 1)
        sl = slice(offset, offset + n)
        offset += n
        theta = t.mean[sl].reshape(shape)
        delta = t.prior_diag.to(theta.dtype).expand_as(t.mean)[sl].reshape(shape)
        h = t.curvature_diag[sl].to(theta.dtype).reshape(shape)
        facs = None
        if t.kron_factors is not None:
            f = t.kron_factors[index]
            if isinstance(f, tuple | list):
                facs = tuple(x.to(theta.dtype) for x in f)
        yield name, theta, delta, facs, h


def _residual(facs: tuple, delta_w: torch.Tensor) -> torch.Tensor:
    """R = G Δ A for a weight, G Δ for a bias (Δ as a (p, q) matrix); for stacked factors
    (grouped convolutions, packed q/k/v: one block per row slice) R_j = G_j Δ_j A_j."""
    d = delta_w.reshape(facs[0].shape[0], -1, delta_w.shape[-1]) if facs[0].ndim == 3 else delta_w
    r = facs[0] @ d  # batched over the slices for stacked factors
    r = r @ facs[1] if len(facs) == 2 else r
    return r.reshape(delta_w.shape)


def _block_cost(s: float, theta, delta, facs, h, removed: torch.Tensor) -> torch.Tensor:
    d = torch.where(removed, -theta, torch.zeros_like(theta))
    prior_part = 0.5 * (delta * d.square()).sum()
    if facs is None:
        return prior_part + 0.5 * s * (h * d.square()).sum()
    return prior_part + 0.5 * s * (d * _residual(facs, d)).sum()


def kron_cost(posterior: object, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """c(M) = ½ vec(Δ)ᵀ Π vec(Δ), Δ = −θ on the masked-out entries, from the posterior's
    blocks (Kronecker: ½ s·tr(G Δ A Δᵀ) + ½ Σ δ Δ²; diagonal: ½ Σ (s·h + δ) Δ²)."""
    t = _block_terms(posterior)
    names = {n for n, _ in t.named_params}
    unknown = sorted(set(masks) - names)
    if unknown:
        raise ValueError(f"masks name {unknown}, which the posterior does not cover")
    return sum(_block_costs(t, masks).values(), t.mean.new_zeros(()))


def _block_costs(
    t: PosteriorTerms, masks: dict[str, torch.Tensor], only: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """c of each masked tensor (or of the tensors in ``only``)."""
    out = {}
    for name, theta, delta, facs, h in _blocks(t):
        if name not in masks or (only is not None and name not in only):
            continue
        removed = ~masks[name].to(theta.device).reshape(theta.shape)
        out[name] = _block_cost(t.curvature_scale, theta, delta, facs, h, removed)
    return out


def _marginal_costs(t: PosteriorTerms, removed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cost of removing each entry next, given the removed set (already-removed: −∞ rank)."""
    s = t.curvature_scale
    out = {}
    for (name, p), (_, theta, delta, facs, h) in zip(t.named_params, _blocks(t)):
        rem = removed.get(name)
        rem = torch.zeros_like(theta, dtype=torch.bool) if rem is None else rem.reshape(theta.shape)
        sq = theta.square()
        if facs is None:
            cost = 0.5 * (s * h + delta) * sq
        else:
            d = torch.where(rem, -theta, torch.zeros_like(theta))
            cost = s * (-theta * _residual(facs, d) + 0.5 * h * sq) + 0.5 * delta * sq
        out[name] = cost.reshape(p.shape)
    return out


def kron_masks(
    posterior: object,
    sparsity: float,
    pattern: str = "unstructured",
    scope: str = "global",
    rounds: int = 8,
    block: tuple[int, int] = (64, 64),
    prune_output_layer: bool = False,
    prune_1d: bool = False,
    model: torch.nn.Module | None = None,
    **prune_kwargs,
) -> PruningMasks:
    """Masks chosen by the Kronecker cost c(M), cross terms included (see module docs).

    The pruned set grows to ``sparsity`` in ``rounds`` equal steps, each ranking entries
    by their marginal cost (summed per unit/block for structured patterns); OPD's mask is
    the one-round special case, and whichever of the two has the lower c(M) is kept; for
    unstructured masks up to ``rounds`` exchange steps follow (within each layer for
    ``scope="layerwise"``), each accepted only if it lowers c(M).
    ``model`` (default: the posterior's) names the parameters the masks are for; other
    keyword arguments go to :func:`~spamkern.pruning.prune`.
    """
    s = check_sparsity(sparsity)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    t = _block_terms(posterior)
    model = model if model is not None else getattr(posterior, "model", None)
    if model is None:
        raise TypeError("kron_masks needs a model (or a posterior with a .model)")
    kwargs = {
        **prune_kwargs,
        "pattern": pattern,
        "scope": scope,
        "block": block,
        "prune_output_layer": prune_output_layer,
        "prune_1d": prune_1d,
    }
    opd = prune(model, opd_scores(posterior, as_dict=True), s, **kwargs)
    if pattern == "unit":
        ex = prune_kwargs.get("example_inputs")
        units = _unit_masks(t, model, opd, s, scope, rounds, prune_output_layer, ex)
        if units is not None:
            return units
    if pattern == "2:4":
        steps = [s]  # every group loses exactly two: one ranking of the marginal costs
    else:
        steps = [s * (k + 1) / rounds for k in range(rounds)]
    removed: dict[str, torch.Tensor] = {}
    masks = opd
    for target in steps:
        costs = _marginal_costs(t, removed)
        floor = min(float(c.min()) for c in costs.values())
        bottom = floor - 1.0 - abs(floor)  # below every finite cost: keeps removals removed
        for name, rem in removed.items():
            costs[name] = torch.where(rem.reshape(costs[name].shape), bottom, costs[name])
        masks = prune(model, costs, target, **kwargs)
        removed = {n: ~m for n, m in masks.items()}
    if float(sum(_block_costs(t, masks).values())) > float(sum(_block_costs(t, opd).values())):
        masks = opd
    if pattern == "unstructured":
        groups = [list(masks)] if scope == "global" else [[n] for n in masks]
        for names in groups:
            masks = _swap_search(t, masks, names, rounds)
    return masks


def _exchange_costs(t: PosteriorTerms, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per entry, the change of c(M) if it alone is removed (kept entries) or the cost it
    adds by being removed (removed entries): s(Δ_ij R'_ij + ½ G_ii A_jj Δ_ij²) + ½ δ Δ_ij²
    with R' = G Δ A without the entry's own term."""
    s = t.curvature_scale
    out = {}
    for (name, p), (_, theta, delta, facs, h) in zip(t.named_params, _blocks(t)):
        if name not in masks:
            continue
        sq = theta.square()
        if facs is None:
            out[name] = (0.5 * (s * h + delta) * sq).reshape(p.shape)
            continue
        d = torch.where(masks[name].reshape(theta.shape), torch.zeros_like(theta), -theta)
        diag = facs[0].diagonal()[:, None]
        if len(facs) == 2:
            diag = diag * facs[1].diagonal()[None, :]
        r = _residual(facs, d) - diag * d
        out[name] = (s * (-theta * r + 0.5 * diag * sq) + 0.5 * delta * sq).reshape(p.shape)
    return out


def _swap_search(t: PosteriorTerms, masks: PruningMasks, names: list[str], rounds: int):
    """Local search at fixed counts: exchange the q removed entries that cost most with the
    q kept entries that would cost least, halving q until c(M) drops; stop when none does."""
    parts = _block_costs(t, masks)
    best = float(sum(parts.values()))
    sizes = [masks[n].numel() for n in names]
    for _ in range(rounds):
        costs = _exchange_costs(t, masks)
        keep = torch.cat([masks[n].reshape(-1) for n in names])
        flat = torch.cat([costs[n].reshape(-1) for n in names])
        kept, gone = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
        add = flat[kept].sort()
        back = flat[gone].sort(descending=True)
        q = min(kept.numel(), gone.numel())
        q = int((add.values[:q] < back.values[:q]).sum())
        improved = False
        while q >= 1:
            trial = keep.clone()
            trial[kept[add.indices[:q]]] = False
            trial[gone[back.indices[:q]]] = True
            candidate = PruningMasks(
                dict(masks),
                pattern=masks.pattern,
                scope=masks.scope,
                block=masks.block,
                target=masks.target,
            )
            changed = set()
            for n, part in zip(names, trial.split(sizes)):
                candidate[n] = part.reshape(masks[n].shape)
                if not torch.equal(candidate[n], masks[n]):
                    changed.add(n)
            new_parts = {**parts, **_block_costs(t, candidate, changed)}
            cost = float(sum(new_parts.values()))
            if cost < best:
                best, masks, parts, improved = cost, candidate, new_parts, True
                break
            q //= 2
        if not improved:
            break
    return masks


# ---------------------------------------------------------------------------- units
def _unit_layers(
    t: PosteriorTerms, model, opd: PruningMasks, prune_output_layer: bool, example_inputs=None
):
    """Per unit-pruned layer (or traced channel family): (its layer's name, next layer's G
    and A, its weight (out, in'), columns per unit, the family or None); None when some
    pruned layer has no next layer to re-fit, a factor is missing or the model cannot be
    traced."""
    if t.kron_factors is None:
        return None
    facs = {n: f for (n, _), f in zip(t.named_params, t.kron_factors)}
    links = _plain_links(model, opd, prune_output_layer)
    if links is None:
        links = _traced_links(model, opd, example_inputs)
    if links is None or None in links:
        return None
    out = []
    for name, (nname, nxt, cols), family in links:
        f = facs.get(f"{nname}.weight")
        if not isinstance(f, tuple) or len(f) != 2 or f[0].ndim != 2:
            return None
        W = nxt.weight.detach().reshape(nxt.weight.shape[0], -1).to(t.mean.dtype)
        out.append((name, f[0].to(W.dtype), f[1].to(W.dtype), W, cols, family))
    return out


def _plain_links(model, opd: PruningMasks, prune_output_layer: bool):
    """(layer, its next layer, None) per unit-pruned layer of a plain chain; [None] when
    one has none; None when the model is not a plain chain."""
    from spamkern.pruning.groups import is_plain_chain
    from spamkern.pruning.reconstruct import _successors

    if not is_plain_chain(model):
        return None
    succ = _successors(model)
    links = []
    for name, _ in prunable_layers(model, prune_output_layer):
        if f"{name}.weight" in opd:
            if name not in succ:
                return [None]
            links.append((name, succ[name], None))
    return links


def _traced_links(model, opd: PruningMasks, example_inputs):
    """(source layer, its reader with columns per *unit*, family) per pruned channel
    family of a traced model; None when one has no single reader (a residual sum)."""
    from spamkern.pruning.groups import channel_families, default_inputs, successors

    ex = example_inputs if example_inputs is not None else default_inputs(model)
    if ex is None:
        return None
    families = channel_families(model, ex)
    succ = successors(model, ex, families)
    links = []
    for f in families:
        layers = {p.rpartition(".")[0] for p in f.producer_params() if p in opd}
        if not layers:
            continue
        source = next((n for n in sorted(layers) if n in succ), None)
        own = [sl for sl in f.producers if sl.param == f"{source}.weight"]
        if source is None or len(own) != 1 or not torch.equal(own[0].root, own[0].index):
            return None
        nname, nxt, per_channel = succ[source]
        links.append((source, (nname, nxt, per_channel * f.unit), f))
    return links


def _unit_costs(s: float, G, Sigma, W, cols: int, alive: torch.Tensor) -> torch.Tensor:
    """Cost of removing each unit (its ``cols`` input columns of the next layer) when the
    kept columns are re-fitted: ½ s·tr(G W_C [Σ_CC]⁻¹ W_Cᵀ), Σ = A_KK⁻¹ over kept K."""
    n_units = W.shape[1] // cols
    idx = torch.arange(W.shape[1], device=W.device).reshape(n_units, cols)
    blocks = Sigma[idx[:, :, None], idx[:, None, :]]  # (units, c, c)
    Wc = W[:, idx].permute(1, 0, 2)  # (units, out, c)
    eye = torch.eye(cols, dtype=W.dtype, device=W.device)
    sol = torch.linalg.solve(blocks + 1e-12 * eye, Wc.transpose(1, 2))  # (units, c, out)
    cost = 0.5 * s * torch.einsum("ucp,po,uoc->u", sol, G, Wc)
    return torch.where(alive, cost, torch.full_like(cost, math.inf))


def _remove_units(Sigma, W, cols: int, units: torch.Tensor):
    """Group OBS step: W ← W − W_S Σ_SS⁻¹ Σ_S:, Σ ← Σ − Σ_:S Σ_SS⁻¹ Σ_S: (S = their columns)."""
    S = (units[:, None] * cols + torch.arange(cols, device=W.device)).reshape(-1)
    inv = torch.linalg.inv(Sigma[S][:, S])
    W = W - W[:, S] @ inv @ Sigma[S]
    Sigma = Sigma - Sigma[:, S] @ inv @ Sigma[S]
    W[:, S] = 0.0
    return Sigma, W


@dataclass
class _UnitLayer:
    """Group-OBS state of one unit-pruned layer, seen from its next layer."""

    name: str
    G: torch.Tensor  # next layer's output factor
    Sigma: torch.Tensor  # inverse of the next layer's damped A, downdated as units go
    W: torch.Tensor  # next layer's weight (out, in'), compensated as units go
    cols: int  # input columns of the next layer per unit
    alive: torch.Tensor  # (units,) bool
    family: ChannelFamily | None = None  # the traced channel family, if any

    def remove(self, units: torch.Tensor) -> None:
        self.Sigma, self.W = _remove_units(self.Sigma, self.W, self.cols, units)
        self.alive[units] = False


def _unit_masks(
    t, model, opd, s: float, scope: str, rounds: int, prune_output_layer: bool, example_inputs
):
    """Units chosen greedily in ``rounds`` by the cost their removal leaves after the next
    layer's least-squares compensation (group OBS on its Kronecker factors)."""
    layers = _unit_layers(t, model, opd, prune_output_layer, example_inputs)
    if not layers:
        return None
    state = []
    for name, G, A, W, cols, family in layers:
        damp = 1e-2 * float(A.diagonal().mean().clamp_min(1e-12))
        Sigma = torch.linalg.inv(A + damp * torch.eye(A.shape[0], dtype=A.dtype, device=A.device))
        alive = torch.ones(A.shape[0] // cols, dtype=torch.bool, device=A.device)
        state.append(_UnitLayer(name, G, Sigma, W.clone(), cols, alive, family))
    sizes = [st.alive.numel() for st in state]
    if scope == "global":
        groups = [list(range(len(state)))]
        quota = [min(round(s * sum(sizes)), sum(sizes) - len(sizes))]
    else:
        groups = [[i] for i in range(len(state))]
        quota = [min(round(s * n), n - 1) for n in sizes]
    for k in range(rounds):
        costs = []
        for st in state:
            cost = _unit_costs(t.curvature_scale, st.G, st.Sigma, st.W, st.cols, st.alive)
            if int(st.alive.sum()) == 1:  # the last unit of a layer always stays
                cost[st.alive] = math.inf
            costs.append(cost)
        for g, q in zip(groups, quota):
            want = round(q * (k + 1) / rounds) - sum(int((~state[i].alive).sum()) for i in g)
            if want <= 0:
                continue
            flat = torch.cat([costs[i] for i in g])
            owner = torch.cat([torch.full_like(costs[i], i, dtype=torch.long) for i in g])
            local = torch.cat([torch.arange(costs[i].numel()) for i in g])
            pick = flat.argsort()[:want]
            pick = pick[torch.isfinite(flat[pick])]
            for i in g:
                units = local[pick[owner[pick] == i]][: int(state[i].alive.sum()) - 1]
                if units.numel():
                    state[i].remove(units)
    masks = PruningMasks(pattern="unit", scope=scope, target=s)
    params = dict(model.named_parameters())
    if state[0].family is not None:
        _family_masks(masks, params, state)
        return masks
    for st in state:
        w = params[f"{st.name}.weight"]
        masks[f"{st.name}.weight"] = st.alive.view(-1, *([1] * (w.ndim - 1))).expand_as(w).clone()
        if f"{st.name}.bias" in params:
            masks[f"{st.name}.bias"] = st.alive.clone()
    return masks


def _family_masks(masks: PruningMasks, params: dict, state: list[_UnitLayer]) -> None:
    """Every producer of each traced family loses the channels of its removed units."""
    for st in state:
        gone = (~st.alive).repeat_interleave(st.family.unit)  # per channel
        for sl in st.family.producers:
            par = params[sl.param]
            m = masks.setdefault(sl.param, torch.ones_like(par, dtype=torch.bool))
            m.index_fill_(sl.dim, sl.index[gone[sl.root]].to(par.device), False)
    removed = sum(int((~st.alive).sum()) for st in state)
    masks.unit_fraction = removed / sum(st.alive.numel() for st in state)
