"""Re-solve the surviving weights after pruning (OBS / SparseGPT-style reconstruction).

With the mask fixed, each output row w of a layer (Linear weight, or a Conv2d filter
viewed as (out, in·kh·kw)) moves its kept entries to

    min_{w'} (w' − w)ᵀ H (w' − w)   subject to   w'_P = 0 on the pruned entries P,

whose solution is  w'_K = w_K + H_KK⁻¹ H_KP w_P  (equivalently, with the inverse,
w' = w − H⁻¹_{:,P} ([H⁻¹]_PP)⁻¹ w_P). H is the layer's input second moment A = E[a aᵀ]
plus a damping λ·mean(diag A)·I: the posterior's own Kronecker factor A (data-free), or
A measured on the pruned network's own inputs, layer by layer (``data`` given: every
earlier layer is already pruned and reconstructed when a layer's inputs are collected;
labels are not needed). Ignoring the output factor G's off-diagonal decouples the rows.

The bias absorbs the input mean: the input is augmented with a constant 1, so H becomes
[[A, μ], [μᵀ, 1]] with μ = E[a] and the bias is one more (always kept) entry of each row.

Removed units (``unit`` masks) are compensated in the next layer instead (the next layer
in a plain chain; in other models the one Linear/Conv2d that alone reads the removed
channels, found by tracing, see :func:`spamkern.pruning.groups.successors`): the removed
inputs a_S are regressed on the kept ones (and a constant), a_S ≈ B a_K + c with
[B c] = [A_SK μ_S] [[A_KK μ_K], [μ_Kᵀ 1]]⁻¹, and W'_K = W_K + W_S B, b' = b + W_S c.

All rows of a layer are solved at once (batched Cholesky on index-gathered sub-matrices,
the smaller of the kept or pruned side, chunked to bound memory).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spamkern.curvature.accumulate import _as_conv2d
from spamkern.ops import conv_patch_gram, gram
from spamkern.pruning.masks import apply_masks
from spamkern.pruning.scores import _X_KEYS, _pick, posterior_terms

__all__ = [
    "DEFAULT_DAMPING",
    "compensate_units",
    "input_statistics",
    "masked_least_squares",
    "reconstruct",
    "reconstruct_layer",
]

DEFAULT_DAMPING = 0.01
_GATHER_ELEMENTS = 1 << 25  # bound on rows · m² of one gathered batch of sub-matrices


# ---------------------------------------------------------------------------- one layer
def _padded_index(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the indices of the True entries first (padded), and which slots are real."""
    counts = select.sum(dim=1)
    m = max(int(counts.max()) if select.numel() else 0, 1)
    order = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=select.device)[None, :] < counts[:, None]
    return order, valid


def _solve_gathered(
    H: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, rhs: torch.Tensor, extra=None
) -> torch.Tensor:
    """Solve H[idx_r, idx_r] x_r = rhs_r for every row r (padding slots act as identity)."""
    out = torch.zeros_like(rhs)
    m = idx.shape[1]
    step = max(1, _GATHER_ELEMENTS // (m * m))
    eye = torch.eye(m, dtype=H.dtype, device=H.device)
    for start in range(0, idx.shape[0], step):
        i, v = idx[start : start + step], valid[start : start + step]
        sub = H[i[:, :, None], i[:, None, :]]
        if extra is not None:  # per-row diagonal addition
            sub = sub + torch.diag_embed(extra[start : start + step].gather(1, i))
        both = v[:, :, None] & v[:, None, :]
        sub = torch.where(both, sub, eye)
        b = torch.where(v, rhs[start : start + step], torch.zeros_like(rhs[start : start + step]))
        chol, info = torch.linalg.cholesky_ex(sub)
        if bool((info != 0).any()):
            raise ValueError(
                "the reconstruction's H is not positive definite on some kept set; increase "
                "the damping (a small multiple of mean diag A, e.g. 0.01)"
            )
        out[start : start + step] = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
    return out


def masked_least_squares(
    W: torch.Tensor, keep: torch.Tensor, H: torch.Tensor, row_diag: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row r: argmin_{w'} (w' − w_r)ᵀ H_r (w' − w_r) with w'_j = 0 where ``keep`` is False.

    ``W`` and ``keep`` are (out, n), ``H`` the shared (n, n) positive (semi)definite matrix,
    ``row_diag`` an optional (out, n) per-row diagonal added to it (H_r = H + diag(row_diag_r)).
    Exact; the smaller side (kept or pruned entries) of each layer is solved.
    """
    if W.ndim != 2 or keep.shape != W.shape or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"need W (out, n), keep of the same shape and H (n, n); got {tuple(W.shape)}, "
            f"{tuple(keep.shape)}, {tuple(H.shape)}"
        )
    keep = keep.to(torch.bool)
    pruned = ~keep
    out = torch.where(keep, W, torch.zeros_like(W))
    if not bool(pruned.any()) or not bool(keep.any()):
        return out
    n_keep, n_pruned = int(keep.sum(1).max()), int(pruned.sum(1).max())
    if row_diag is not None or n_keep <= n_pruned:
        idx, valid = _padded_index(keep)
        rhs = (torch.where(pruned, W, torch.zeros_like(W)) @ H).gather(1, idx)
        x = _solve_gathered(H, idx, valid, rhs, row_diag)
        delta = torch.zeros_like(W).scatter_add_(1, idx, torch.where(valid, x, 0.0))
        return out + torch.where(keep, delta, torch.zeros_like(W))
    chol, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(
            "the reconstruction's H is not positive definite; increase the damping (a small "
            "multiple of mean diag A, e.g. 0.01)"
        )
    H_inv = torch.cholesky_inverse(chol)
    idx, valid = _padded_index(pruned)
    y = _solve_gathered(H_inv, idx, valid, W.gather(1, idx))
    y = torch.where(valid, y, 0.0)
    corr = torch.zeros_like(W)
    step = max(1, _GATHER_ELEMENTS // (idx.shape[1] * W.shape[1]))
    for start in range(0, W.shape[0], step):  # rows of H⁻¹ at the pruned indices, chunked
        rows = H_inv[idx[start : start + step]]
        corr[start : start + step] = torch.einsum("rm,rmn->rn", y[start : start + step], rows)
    return torch.where(keep, W - corr, torch.zeros_like(W))


def _damped(A: torch.Tensor, damping: float) -> torch.Tensor:
    scale = float(A.diagonal().mean()) if A.numel() else 0.0
    return A + (damping * max(scale, 1e-12)) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)


def _augmented(A: torch.Tensor, mean: torch.Tensor, damping: float) -> torch.Tensor:
    """[[A + λI, μ], [μᵀ, 1 + λ']] for a bias that absorbs the input mean."""
    n = A.shape[0]
    H = A.new_empty(n + 1, n + 1)
    H[:n, :n] = _damped(A, damping)
    H[:n, n] = mean
    H[n, :n] = mean
    H[n, n] = 1.0 + damping
    return H


@torch.no_grad()
def reconstruct_layer(
    weight: torch.Tensor,
    keep: torch.Tensor,
    A: torch.Tensor,
    bias: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
    row_damping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (weight, bias) of one layer: pruned entries 0, kept entries re-solved.

    ``weight``/``keep`` are (out, in) or a Conv2d's (out, in, kh, kw) (worked on as
    (out, in·kh·kw), A's layout). With ``bias`` and ``mean`` = E[a] the bias absorbs the
    input mean; ``row_damping`` (out, in·kh·kw) replaces the λ·mean(diag A) damping of
    the weight entries by a per-row diagonal (e.g. δ/(s·G_ii) from the posterior).
    """
    W = weight.reshape(weight.shape[0], -1)
    K = keep.reshape(W.shape).to(torch.bool)
    dt = torch.promote_types(W.dtype, torch.float64) if W.device.type == "cpu" else W.dtype
    A = A.to(dt)
    if A.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"A must be ({W.shape[1]}, {W.shape[1]}) for a weight viewed as {tuple(W.shape)}, "
            f"got {tuple(A.shape)}"
        )
    rd = None if row_damping is None else row_damping.reshape(W.shape).to(dt)
    dmp = 0.0 if rd is not None else damping
    if bias is not None and mean is not None:
        H = _augmented(A, mean.to(dt).reshape(-1), dmp)
        Wa = torch.cat([W.to(dt), bias.to(dt)[:, None]], dim=1)
        Ka = torch.cat([K, torch.ones_like(K[:, :1])], dim=1)
        if rd is not None:
            rd = torch.cat([rd, torch.zeros_like(rd[:, :1])], dim=1)
        new = masked_least_squares(Wa, Ka, H, rd)
        return new[:, :-1].reshape(weight.shape).to(weight.dtype), new[:, -1].to(bias.dtype)
    new = masked_least_squares(W.to(dt), K, _damped(A, dmp), rd)
    return new.reshape(weight.shape).to(weight.dtype), bias


# ---------------------------------------------------------------------------- statistics
class _Stop(Exception):
    """Ends a forward pass once the hooked layer has seen its input."""


def _inputs(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Input batches from X, (X, y), a dataset-like iterable of x / (x, ...) / dict batches."""
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    if isinstance(data, tuple | list) and data and isinstance(data[0], torch.Tensor):
        yield from data[0].split(batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be inputs X, a tuple (X, y) or an iterable of batches (x, (x, y) or "
            f"dicts), got {type(data).__name__}"
        )
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield batch
        elif isinstance(batch, dict):
            yield _pick(batch, _X_KEYS)
        else:
            yield batch[0]


@torch.no_grad()
def input_statistics(
    model: nn.Module, layer: nn.Module, data, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, μ) of ``layer``'s input over ``data``: E[a aᵀ] and E[a], Conv2d inputs unfolded
    into (in·kh·kw) patches (averaged over positions, the layout of the Kronecker A)."""
    p = next(model.parameters())
    sums: dict[str, torch.Tensor | int] = {"A": None, "mu": None, "rows": 0}

    def hook(mod, inputs, _output):
        a = inputs[0].detach()
        if isinstance(mod, nn.Conv2d):
            a, kernel, stride, padding, dilation = _as_conv2d(mod, a)
            u = F.unfold(a.sum(0, keepdim=True), kernel, dilation, padding, stride)
            rows = a.shape[0] * u.shape[-1]
            sums["A"] = conv_patch_gram(a, kernel, stride, padding, dilation, out=sums["A"])
            mu = u[0].sum(1)
        else:
            flat = a.reshape(-1, a.shape[-1])
            rows = flat.shape[0]
            sums["A"] = gram(flat, sums["A"])
            mu = flat.sum(0)
        sums["mu"] = mu if sums["mu"] is None else sums["mu"] + mu
        sums["rows"] += rows
        raise _Stop

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for x in _inputs(data, batch_size):
            with contextlib.suppress(_Stop):
                model(x.to(device=p.device))
    finally:
        handle.remove()
        model.train(was_training)
    if not sums["rows"]:
        raise ValueError("data yielded no inputs for the layer (empty data, or the layer unused)")
    return sums["A"] / sums["rows"], sums["mu"] / sums["rows"]


# ---------------------------------------------------------------------------- network
def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _check_layers(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Every masked weight must belong to a layer the reconstruction can re-solve."""
    handled = {
        _pname(n, "weight")
        for n, m in _layers(model)
        if not isinstance(m, nn.Conv2d) or m.groups == 1
    }
    other = sorted(n for n, m in masks.items() if m.ndim >= 2 and n not in handled)
    if other:
        raise ValueError(
            f"reconstruction re-solves Linear and groups=1 Conv2d weights; the masks also "
            f"prune {other} — use reconstruct='none' for this model"
        )


def _pname(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


class _Stats:
    """Where a layer's (A, μ) come from: the posterior's factors or the data."""

    def __init__(self, posterior, data, batch_size: int):
        self.data, self.batch_size = data, batch_size
        self.kron: dict[str, tuple] = {}
        self.means: dict[str, torch.Tensor] = {}
        self.terms = None
        if data is None:
            if posterior is None:
                raise ValueError("reconstruction needs data or a Kronecker posterior, got neither")
            t = posterior_terms(posterior)
            if t.kron_factors is None:
                raise ValueError(
                    f"data-free reconstruction needs the posterior's Kronecker factor A; a "
                    f"{type(posterior).__name__} without Kronecker blocks has none — pass data "
                    "(inputs, no labels needed) or fit with structure='kron'"
                )
            self.terms = t
            self.kron = {n: f for (n, _), f in zip(t.named_params, t.kron_factors)}
            self.means = dict(t.input_means or {})

    def __call__(self, model: nn.Module, name: str, layer: nn.Module):
        """(A, μ or None) of the layer's input."""
        if self.data is not None:
            return input_statistics(model, layer, self.data, self.batch_size)
        wname = _pname(name, "weight")
        facs = self.kron.get(wname)
        if not isinstance(facs, tuple | list) or len(facs) != 2 or facs[1].ndim != 2:
            raise ValueError(
                f"the posterior has no single Kronecker factor A for {wname!r} (grouped "
                "layers have one per group); pass data (inputs, no labels needed)"
            )
        return facs[1], self.means.get(wname)

    def prior_row_damping(self, name: str) -> torch.Tensor:
        """δ_ij / (s·G_ii): the posterior row block s·G_ii·A + diag(δ_i) rescaled to A's units."""
        t, wname = self.terms, _pname(name, "weight")
        offset = 0
        for n, p in t.named_params:
            if n == wname:
                delta = t.prior_diag.expand_as(t.mean)[offset : offset + p.numel()]
                g = self.kron[wname][0].diagonal().clamp_min(1e-12)
                rows = delta.reshape(p.shape[0], -1)
                return rows / (t.curvature_scale * g[:, None].to(rows.dtype))
            offset += p.numel()
        raise ValueError(f"the posterior does not cover {wname!r}")


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    posterior: object | None = None,
    data=None,
    damping: float | str = DEFAULT_DAMPING,
    absorb_bias: bool = True,
    batch_size: int = 256,
    example_inputs=None,
    skipped: list[str] | None = None,
) -> nn.Module:
    """A new model: ``masks`` applied and the survivors re-solved (see the module docs).

    Without ``data`` the posterior's Kronecker factors A (and the recorded input means,
    when the posterior has them) define H; with ``data`` (inputs; labels ignored) each
    layer's A and μ are measured on the already pruned and reconstructed network.
    ``damping``: λ in H = A + λ·mean(diag A)·I, or ``"prior"`` (data-free only) for the
    posterior's own row blocks s·G_ii·A + diag(δ_i). Unit masks (``pattern="unit"``) are
    compensated in the next layer (:func:`compensate_units`; ``example_inputs`` and
    ``skipped`` are its).
    """
    if damping == "prior" and data is not None:
        raise ValueError("damping='prior' uses the posterior's factors; it needs data=None")
    if not (damping == "prior" or (isinstance(damping, int | float) and damping >= 0)):
        raise ValueError(f"damping must be a number ≥ 0 or 'prior', got {damping!r}")
    stats = _Stats(posterior, data, batch_size)
    if getattr(masks, "pattern", None) == "unit":
        return _compensate(model, masks, stats, damping, absorb_bias, example_inputs, skipped)
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks name {unknown}, which are not parameters of the model")
    _check_layers(work, masks)
    for name, layer in _layers(work):
        wname = _pname(name, "weight")
        if wname not in masks:
            continue
        A, mu = stats(work, name, layer)
        bias = layer.bias if absorb_bias and mu is not None else None
        rd = stats.prior_row_damping(name) if damping == "prior" else None
        w, b = reconstruct_layer(
            layer.weight,
            masks[wname],
            A,
            None if bias is None else bias.detach(),
            mu,
            0.0 if rd is not None else float(damping),
            rd,
        )
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(b)
    return apply_masks(work, masks)


# ---------------------------------------------------------------------------- units
def _successors(model: nn.Module) -> dict[str, tuple[str, nn.Module, int]]:
    """Layer name → (next layer's name, next layer, input columns per unit) in a Sequential."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            "unit compensation follows a residual-free nn.Sequential stack (the next layer of "
            f"each pruned one); got a {type(model).__name__} — use reconstruct='none' for it"
        )
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    out, prev, flattened = {}, None, False
    for name, mod in leaves:
        if isinstance(mod, nn.Flatten):
            flattened = True
        if not isinstance(mod, nn.Linear | nn.Conv2d):
            continue
        if prev is not None:
            pname, pmod = prev
            if isinstance(mod, nn.Conv2d):
                cols = mod.weight[0, 0].numel()
            elif isinstance(pmod, nn.Conv2d):
                if not flattened or mod.in_features % pmod.out_channels:
                    raise ValueError(
                        f"cannot map the channels of {pname!r} onto the inputs of {name!r}"
                    )
                cols = mod.in_features // pmod.out_channels
            else:
                cols = 1
            out[pname] = (name, mod, cols)
        prev, flattened = (name, mod), False
    return out


def _compensation(
    A: torch.Tensor, mu: torch.Tensor | None, removed: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B c] of the least-squares regression a_S ≈ B a_K + c (c only when μ is given)."""
    keep = ~removed
    S, K = removed.nonzero().squeeze(1), keep.nonzero().squeeze(1)
    A_KK = _damped(A[K][:, K], damping)
    if mu is None:
        return _psd_solve(A_KK, A[K][:, S]).T, None
    n = K.numel()
    M = A.new_empty(n + 1, n + 1)
    M[:n, :n], M[:n, n], M[n, :n], M[n, n] = A_KK, mu[K], mu[K], 1.0
    C = torch.cat([A[S][:, K], mu[S][:, None]], dim=1)
    Bc = _psd_solve(M, C.T).T
    return Bc[:, :n], Bc[:, n]


def _psd_solve(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """M⁻¹ rhs by Cholesky; the minimum-norm solution when M is singular (dead inputs)."""
    chol, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(M, hermitian=True) @ rhs


def compensate_units(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    posterior: object | None = None,
    data=None,
    damping: float = DEFAULT_DAMPING,
    absorb_bias: bool = True,
    batch_size: int = 256,
    example_inputs=None,
    skipped: list[str] | None = None,
) -> nn.Module:
    """A new model with the unit masks applied and each next layer's kept input columns
    re-fitted by least squares on its A (bias absorbing the regression's intercept).

    A (and μ) come from the posterior's factors, or from ``data`` measured layer by layer
    on the network whose earlier layers are already pruned and compensated.
    Plain ``nn.Sequential`` chains are followed in order; other models are traced on
    ``example_inputs`` (or a batch synthesised as for :func:`~spamkern.pruning.prune`) and
    compensated where :func:`spamkern.pruning.groups.successors` finds one next layer
    reading the removed channels. Elsewhere (channels of a residual sum, the output layer)
    the units are only removed; their layer names are appended to ``skipped`` if given.
    """
    stats = _Stats(posterior, data, batch_size)
    return _compensate(model, masks, stats, damping, absorb_bias, example_inputs, skipped)


def _plain_plan(model: nn.Module, masks) -> list[tuple[str | None, list[str]]]:
    """Per unit-pruned layer of a plain chain: (the layer, its own masked parameters)."""
    steps = []
    for name, _ in _layers(model):
        own = [p for p in (_pname(name, "weight"), _pname(name, "bias")) if p in masks]
        if own:
            steps.append((name, own))
    return steps


def _call_order(model: nn.Module, example_inputs) -> dict[str, int]:
    """Module name → position of its first call in a forward of ``example_inputs``."""
    from spamkern.pruning.groups import _call

    order: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, _inputs, _output):
        order.setdefault(names[mod], len(order))

    handles = [m.register_forward_hook(hook) for m in names if isinstance(m, nn.Linear | nn.Conv2d)]
    was_training = model.training
    model.eval()
    try:
        _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order


def _traced_plan(model: nn.Module, masks, example_inputs):
    """Per coupled family with masked producers, in call order: (its layer whose next layer
    can be re-fitted, or None; all its masked parameters), and the successor map."""
    from spamkern.pruning.groups import channel_families, successors

    families = channel_families(model, example_inputs)
    succ = successors(model, example_inputs, families)
    order = _call_order(model, example_inputs)
    steps = []
    for f in families:
        params = sorted(p for p in f.producer_params() if p in masks)
        if not params:
            continue
        layers = {p.rpartition(".")[0] for p in params}
        source = next((n for n in sorted(layers) if n in succ), None)
        first = min(order.get(n, len(order)) for n in layers)
        name = source or min(layers, key=lambda n: (order.get(n, len(order)), n))
        steps.append((first, name, source is not None, params))
    steps.sort(key=lambda step: step[0])
    return [(name, params, ok) for _, name, ok, params in steps], succ


def _unit_plan(model: nn.Module, masks, example_inputs):
    """(steps, successors): each step (a pruned layer, the masked parameters to zero after
    it, whether its next layer can be re-fitted), in forward order."""
    from spamkern.pruning.groups import default_inputs, is_plain_chain

    if is_plain_chain(model):
        succ = _successors(model)
        return [(n, own, n in succ) for n, own in _plain_plan(model, masks)], succ
    if example_inputs is None:
        example_inputs = default_inputs(model)
    if example_inputs is None:
        raise ValueError(
            f"unit compensation traces a {type(model).__name__} (not a plain nn.Sequential "
            "chain) to find each pruned layer's next layer; pass example_inputs (a batch the "
            "model accepts), or use reconstruct='none'"
        )
    return _traced_plan(model, masks, example_inputs)


@torch.no_grad()
def _compensate(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    stats: _Stats,
    damping: float | str,
    absorb_bias: bool,
    example_inputs=None,
    skipped: list[str] | None = None,
) -> nn.Module:
    """Masks applied step by step in forward order, each step's removed units first
    compensated in the next layer where :func:`spamkern.pruning.groups.successors` (or,
    for a plain chain, the next layer in order) gives one; the layers where none could be
    are appended to ``skipped``."""
    lam = DEFAULT_DAMPING if damping == "prior" else float(damping)
    work = copy.deepcopy(model)
    plan, succ = _unit_plan(work, masks, example_inputs)
    for name, params, refit in plan:
        wm = masks.get(_pname(name, "weight"))
        removed = None if wm is None else ~wm.reshape(wm.shape[0], -1).any(dim=1)
        if refit and removed is not None and bool(removed.any()):
            nname, nxt, cols = succ[name]
            A, mu = stats(work, nname, nxt)
            use_bias = absorb_bias and mu is not None and nxt.bias is not None
            _refit(nxt, A, mu if use_bias else None, removed.repeat_interleave(cols), lam)
        elif skipped is not None and any(not bool(masks[k].all()) for k in params):
            skipped.append(name)
        apply_masks(work, {k: masks[k] for k in params})  # later layers see it
    return apply_masks(work, masks)


def _refit(nxt: nn.Module, A, mu, col_removed: torch.Tensor, lam: float) -> None:
    """W'_K = W_K + W_S B, b' = b + W_S c, W'_S = 0 (see the module docs)."""
    B, c = _compensation(A.double(), None if mu is None else mu.double(), col_removed, lam)
    W = nxt.weight.reshape(nxt.weight.shape[0], -1)
    W_S = W[:, col_removed].double()
    W_new = W.double().clone()
    W_new[:, ~col_removed] += W_S @ B
    W_new[:, col_removed] = 0.0
    nxt.weight.copy_(W_new.reshape(nxt.weight.shape).to(nxt.weight.dtype))
    if c is not None:
        nxt.bias.add_((W_S @ c).to(nxt.bias.dtype))
