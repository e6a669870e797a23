"""Pruning scores, one value per parameter, aligned with ``model.parameters()``.

Lowest score = pruned first, for every score here. Each function returns a flat (P,)
tensor over the trainable parameters in ``model.parameters()`` order, or with
``as_dict=True`` a dict name → tensor of the parameter's shape. Scores are computed once
and reused for every sparsity level.

* OPD (ours): ½ θ² diag Π with Π the Laplace posterior precision.
* magnitude |θ|; random U(0, 1); SNIP |θ ∘ ∂L/∂θ|; OBD ½ θ² H_ii (GGN diagonal of the
  MAP model); SynFlow |θ ∘ ∂R/∂θ| (R = sum of outputs of the |θ|-network on all-ones input).
* GraSP defines S = −θ ∘ (H ∂L/∂θ) and removes the *largest* S; to keep "lowest is
  pruned" we return −S = θ ∘ (H ∂L/∂θ), which prunes the same weights.

L is the mean cross-entropy over the data given (all batches), H its Hessian.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spamkern.ops import precision_and_opd

__all__ = [
    "PosteriorTerms",
    "flatten_scores",
    "grasp_scores",
    "magnitude_scores",
    "obd_scores",
    "opd_scores",
    "posterior_terms",
    "random_scores",
    "register_posterior_adapter",
    "scores_to_dict",
    "snip_scores",
    "synflow_scores",
    "trainable_named_parameters",
]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- alignment
def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that (P,) vectors are aligned with."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _to_output(
    named: list[tuple[str, nn.Parameter]], flat: torch.Tensor, as_dict: bool
) -> torch.Tensor | dict[str, torch.Tensor]:
    if not as_dict:
        return flat
    out, offset = {}, 0
    for name, p in named:
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def scores_to_dict(
    model: nn.Module, scores: torch.Tensor | dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Scores as a dict name → tensor of the parameter's shape, checked against ``model``.

    ``scores`` may also be a fitted posterior (spamkern's or laplace-torch's): it is then
    scored with OPD, so ``sk.prune(model, posterior, ...)`` works directly.

    A flat tensor must have exactly P = Σ numel of the trainable parameters; a dict may
    name a subset of them (the others are then not prunable), each with its exact shape.
    """
    named = trainable_named_parameters(model)
    if not isinstance(scores, torch.Tensor | dict):  # a fitted posterior: score it with OPD
        scores = opd_scores(scores)
    if isinstance(scores, dict):
        shapes = {n: p.shape for n, p in named}
        for name, s in scores.items():
            if name not in shapes:
                raise ValueError(
                    f"scores name {name!r}, which is not a trainable parameter of the model; "
                    f"accepted names: {sorted(shapes)}"
                )
            if not isinstance(s, torch.Tensor) or s.shape != shapes[name]:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(
                    f"scores[{name!r}] has shape {got}, the parameter has {tuple(shapes[name])}"
                )
        return dict(scores)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"scores must be a (P,) tensor or a dict name → tensor, got {type(scores).__name__}"
        )
    n_params = sum(p.numel() for _, p in named)
    if scores.ndim != 1 or scores.numel() != n_params:
        raise ValueError(
            f"flat scores must be a (P,) vector with P = {n_params} (the model's trainable "
            f"parameters), got shape {tuple(scores.shape)}"
        )
    return _to_output(named, scores, as_dict=True)


def flatten_scores(model: nn.Module, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`scores_to_dict` for a complete dict."""
    named = trainable_named_parameters(model)
    missing = [n for n, _ in named if n not in scores]
    if missing:
        raise ValueError(f"scores miss the parameters {missing}")
    return torch.cat([scores[n].reshape(-1) for n, _ in named])


def _flat_params(named: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in named])


# ---------------------------------------------------------------------------- OPD
@dataclass
class PosteriorTerms:
    """What the pruning scores read from a posterior.

    OPD needs θ*, diag(H), the prior diagonal and the scaling s (Π = s·H + diag δ). The
    optional fields serve the scores and the reconstruction beyond the diagonal:

    * ``covariance_diag``: a callable returning the (P,) diagonal of Π⁻¹ (OBS saliency);
    * ``kron_factors``: per tensor of ``named_params``, ``(G, A)`` for a Kronecker weight,
      ``(G,)`` for a Kronecker bias, or the curvature diagonal shaped like the tensor;
    * ``input_means``: tensor name → E[a], the mean layer input in the layout of A
      (lets a bias absorb the input mean in data-free reconstruction);
    * ``dense_curvature``: True when H is a full matrix (e.g. laplace-torch's
      FullLaplace): neither ``kron_factors`` nor the diagonal describe its cross terms.

    ``None`` means the posterior does not provide it; the functions that need it say so.
    """

    named_params: list[tuple[str, nn.Parameter]]
    mean: torch.Tensor
    curvature_diag: torch.Tensor
    prior_diag: torch.Tensor
    curvature_scale: float
    covariance_diag: Callable[[], torch.Tensor] | None = None
    kron_factors: list | None = None
    input_means: dict[str, torch.Tensor] | None = None
    dense_curvature: bool = False  # H is a dense (P, P) matrix no block form here describes


_ADAPTERS: list[tuple[Callable[[object], bool], Callable[[object], PosteriorTerms]]] = []


def register_posterior_adapter(
    accepts: Callable[[object], bool], to_terms: Callable[[object], PosteriorTerms]
) -> None:
    """Teach :func:`opd_scores` another posterior type (e.g. a fitted laplace-torch object).

    ``accepts(obj)`` says whether the adapter applies; ``to_terms(obj)`` returns the
    :class:`PosteriorTerms`. Adapters registered later are tried first.
    """
    _ADAPTERS.insert(0, (accepts, to_terms))


def _is_spamkern_posterior(obj: object) -> bool:
    return all(hasattr(obj, a) for a in ("mean", "curvature_diag", "prior", "model"))


def _spamkern_terms(post) -> PosteriorTerms:
    named = list(getattr(post, "named_params", None) or trainable_named_parameters(post.model))
    cov = getattr(post, "covariance_diag", None)
    kron = None
    if getattr(post, "structure", None) == "kron":
        kron = [tuple(f) if isinstance(f, list | tuple) else f for f in post.kron_factors]
    means = getattr(getattr(post, "curvature", None), "input_means", None)
    if means:  # stored per block index by the curvature pass
        means = {named[i][0]: m for i, m in means.items()}
    return PosteriorTerms(
        named_params=named,
        mean=post.mean.detach(),
        curvature_diag=post.curvature_diag().detach(),
        prior_diag=post.prior.precision_diag().detach(),
        curvature_scale=float(getattr(post, "curvature_scale", 1.0)),
        covariance_diag=cov if callable(cov) else None,
        kron_factors=kron,
        input_means=means or None,
    )


def _is_precision_only(obj: object) -> bool:
    return all(hasattr(obj, a) for a in ("mean", "precision_diag", "model"))


def _precision_only_terms(post) -> PosteriorTerms:
    # Anything that only exposes diag Π: feed it as the "curvature" with a zero prior.
    named = list(getattr(post, "named_params", None) or trainable_named_parameters(post.model))
    precision = post.precision_diag().detach()
    cov = getattr(post, "covariance_diag", None)
    return PosteriorTerms(
        named,
        post.mean.detach(),
        precision,
        torch.zeros_like(precision),
        1.0,
        covariance_diag=cov if callable(cov) else None,
    )


def _load_optional_adapters(posterior: object) -> None:
    """Register the laplace-torch adapter when a laplace-torch object is passed in."""
    if type(posterior).__module__.split(".")[0] == "laplace" and "laplace" in sys.modules:
        importlib.import_module("spamkern.integrations.laplace")


def posterior_terms(posterior: object) -> PosteriorTerms:
    """The boundary between OPD and posterior implementations (see :class:`PosteriorTerms`)."""
    _load_optional_adapters(posterior)
    for accepts, to_terms in _ADAPTERS:
        if accepts(posterior):
            return to_terms(posterior)
    if _is_spamkern_posterior(posterior):
        return _spamkern_terms(posterior)
    if _is_precision_only(posterior):
        return _precision_only_terms(posterior)
    raise TypeError(
        f"opd_scores cannot read a posterior of type {type(posterior).__name__}: it needs "
        ".model, .mean and either .curvature_diag()/.prior.precision_diag()/.curvature_scale "
        "(spamkern.fit_laplace) or .precision_diag(); register other types with "
        "register_posterior_adapter"
    )


def opd_scores(posterior: object, as_dict: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """OPD s_i = ½ θ_i² Π_ii from any posterior (kron or diag, every prior), in one pass."""
    if callable(getattr(posterior, "precision_and_opd", None)):  # fused: reads factor diagonals
        named = list(posterior.named_params)
        _, scores = posterior.precision_and_opd()
        return _to_output(named, scores.detach(), as_dict)
    t = posterior_terms(posterior)
    n_params = sum(p.numel() for _, p in t.named_params)
    if t.mean.numel() != n_params:
        raise ValueError(
            f"posterior mean has {t.mean.numel()} entries but its parameters hold {n_params}"
        )
    _, scores = precision_and_opd(
        t.mean, t.curvature_diag.to(t.mean.dtype), t.prior_diag.to(t.mean.dtype), t.curvature_scale
    )
    return _to_output(t.named_params, scores, as_dict)


# ---------------------------------------------------------------------------- data helpers
def iterate_batches(data, batch_size: int = 256) -> Iterator[Batch]:
    """(x, y) batches from a tuple of tensors (split on their device) or an iterable."""
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        yield from zip(x.split(batch_size), y.split(batch_size))
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a tuple (X, y) of tensors or an iterable of (x, y) batches, "
            f"got {type(data).__name__}"
        )
    for batch in data:
        if isinstance(batch, dict):
            yield _pick(batch, _X_KEYS), _pick(batch, _Y_KEYS)
        else:
            yield batch[0], batch[1]


_X_KEYS = ("x", "input", "inputs")
_Y_KEYS = ("y", "labels", "label", "targets", "target")


def _pick(batch: dict, keys: tuple[str, ...]) -> torch.Tensor:
    for k in keys:
        if k in batch:
            return batch[k]
    raise ValueError(f"a dict batch needs one of the keys {keys}, got {sorted(batch)}")


def _mean_loss_grad(
    model: nn.Module,
    data,
    loss_fn: LossFn,
    params: list[nn.Parameter],
    create_graph: bool = False,
    batch_size: int = 256,
) -> list[torch.Tensor]:
    """∂L/∂θ of the mean loss over all of ``data`` (batch losses weighted by their size)."""
    batches = list(iterate_batches(data, batch_size))
    n_total = sum(int(y.shape[0]) for _, y in batches)
    if n_total == 0:
        raise ValueError("data holds no samples")
    grads = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(model(x), y) * (y.shape[0] / n_total)
        g = torch.autograd.grad(loss, params, create_graph=create_graph)
        grads = [a + b for a, b in zip(grads, g)]
    return grads


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


# ---------------------------------------------------------------------------- baselines
def magnitude_scores(
    model: nn.Module, as_dict: bool = False
) -> torch.Tensor | dict[str, torch.Tensor]:
    """|θ|."""
    named = trainable_named_parameters(model)
    return _to_output(named, _flat_params(named).abs(), as_dict)


def random_scores(
    model: nn.Module, generator: torch.Generator | None = None, as_dict: bool = False
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Independent U(0, 1) scores (drawn with ``generator`` on its device, then moved)."""
    named = trainable_named_parameters(model)
    theta = _flat_params(named)
    dev = generator.device if generator is not None else torch.device("cpu")
    r = torch.rand(theta.numel(), generator=generator, device=dev, dtype=theta.dtype)
    return _to_output(named, r.to(theta.device), as_dict)


def snip_scores(
    model: nn.Module,
    data,
    loss_fn: LossFn = _ce,
    batch_size: int = 256,
    as_dict: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """SNIP connection sensitivity |θ ∘ ∂L/∂θ|, L the mean loss over ``data``."""
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    grads = _mean_loss_grad(model, data, loss_fn, params, batch_size=batch_size)
    flat = torch.cat([(p.detach() * g).abs().reshape(-1) for p, g in zip(params, grads)])
    return _to_output(named, flat, as_dict)


def grasp_scores(
    model: nn.Module,
    data,
    loss_fn: LossFn = _ce,
    batch_size: int = 256,
    as_dict: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """θ ∘ (H g), g = ∂L/∂θ, H = ∂²L/∂θ² (Hessian–vector product by double backprop).

    GraSP's own score is S = −θ ∘ (H g) and it removes the largest S; this returns −S
    so that pruning the lowest scores removes the same weights.
    """
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    g = [t.detach() for t in _mean_loss_grad(model, data, loss_fn, params, batch_size=batch_size)]
    batches = list(iterate_batches(data, batch_size))
    n_total = sum(int(y.shape[0]) for _, y in batches)
    hg = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(model(x), y) * (y.shape[0] / n_total)
        gb = torch.autograd.grad(loss, params, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(gb, g))
        hvp = torch.autograd.grad(z, params)
        hg = [a + b for a, b in zip(hg, hvp)]
    flat = torch.cat([(p.detach() * h).reshape(-1) for p, h in zip(params, hg)])
    return _to_output(named, flat, as_dict)


def obd_scores(
    model: nn.Module,
    data=None,
    posterior: object | None = None,
    as_dict: bool = False,
    **fit_kwargs,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """OBD ½ θ² H_ii with H_ii the exact GGN diagonal (summed loss) of the given model.

    The diagonal comes from ``spamkern.fit_laplace(model, data, structure="diag",
    curvature="ggn")``; pass ``posterior`` to reuse a diag-GGN fit already made.
    """
    if posterior is None:
        if data is None:
            raise ValueError("obd_scores needs data (or a fitted diag-GGN posterior)")
        from spamkern import fit_laplace

        fit_kwargs.setdefault("progress", False)
        fit_kwargs.setdefault("progress", False)
        posterior = fit_laplace(model, data, structure="diag", curvature="ggn", **fit_kwargs)
    named = trainable_named_parameters(model)
    h = posterior.curvature_diag().detach()
    theta = _flat_params(named)
    if h.shape != theta.shape:
        raise ValueError(
            f"the posterior's curvature diagonal has shape {tuple(h.shape)}, the model has "
            f"{theta.numel()} trainable parameters"
        )
    return _to_output(named, 0.5 * theta.square() * h.to(theta.dtype), as_dict)


def synflow_scores(
    model: nn.Module, input_shape: tuple[int, ...], as_dict: bool = False
) -> torch.Tensor | dict[str, torch.Tensor]:
    """SynFlow |θ ∘ ∂R/∂θ|, R = Σ outputs of the |θ|-network on one all-ones input.

    Computed on a float64 copy in eval mode (R grows multiplicatively with depth); the
    model itself is not modified. Single-shot (the original iterates 100 prune rounds).
    """
    named = trainable_named_parameters(model)
    work = copy.deepcopy(model).double().eval()
    work_named = trainable_named_parameters(work)
    with torch.no_grad():
        for _, p in work_named:
            p.abs_()
    device = named[0][1].device if named else torch.device("cpu")
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
    r = work(ones).sum()
    grads = torch.autograd.grad(r, [p for _, p in work_named])
    flat = torch.cat([(p.detach() * g).abs().reshape(-1) for (_, p), g in zip(work_named, grads)])
    return _to_output(named, flat.to(named[0][1].dtype), as_dict)
