"""Classification metrics and the two predictives they are computed on.

Metrics take class probabilities ``probs`` (N, C) and integer labels ``y`` (N,):
accuracy, NLL (mean negative log probability of the true class), ECE (top label, equal-
width bins) and Brier (Σ_c (p_c − 1[y = c])², mean over samples).

Predictives: :func:`map_predictive` is softmax of the network output;
:func:`glm_predictive` is the Laplace (linearised, GLM) predictive with the probit
approximation, which gives the uncertainty numbers their Bayesian meaning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

__all__ = [
    "accuracy",
    "brier",
    "classification_metrics",
    "ece",
    "glm_predictive",
    "map_predictive",
    "nll",
]


def _check(probs: torch.Tensor, y: torch.Tensor) -> None:
    """Probabilities (N ≥ 1, C) with rows summing to 1, integer labels in [0, C)."""
    if not isinstance(probs, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("probs and labels must be torch tensors")
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C) class probabilities, got {tuple(probs.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("probs is empty (N = 0): metrics of no predictions are undefined")
    if y.ndim != 1 or y.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {probs.shape[0]} matching probs, got {tuple(y.shape)}"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= probs.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {probs.shape[1] - 1}] for {probs.shape[1]} classes, got "
            f"labels in [{lo}, {hi}]"
        )
    _check_probabilities(probs)


def _check_probabilities(probs: torch.Tensor) -> None:
    """Refuse logits, NaN and unnormalised rows: they give silently wrong metrics."""
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating tensor, got {probs.dtype}")
    p = probs.to(torch.float64)
    if not bool(torch.isfinite(p).all()):
        raise ValueError("probs contains NaN or Inf")
    tol = 1e-2 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-4
    row_error = float((p.sum(dim=1) - 1.0).abs().max())
    if bool((p < 0).any()) or bool((p > 1).any()) or row_error > tol:
        raise ValueError(
            "probs must be class probabilities (entries in [0, 1], rows summing to 1; "
            f"largest row-sum error {row_error:.3g}): pass softmax outputs, not logits"
        )


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of samples whose most probable class is the label."""
    _check(probs, y)
    return (probs.argmax(dim=1) == y).to(torch.float64).mean().item()


def nll(probs: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log probability of the true class (probabilities clamped at ``eps``)."""
    _check(probs, y)
    p_true = probs.gather(1, y.long().unsqueeze(1)).squeeze(1).to(torch.float64)
    return (-p_true.clamp_min(eps).log()).mean().item()


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 10) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins over (0, 1].

    Bin b holds the samples whose confidence lies in (b/n, (b+1)/n]; ECE is
    Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)|.
    """
    _check(probs, y)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf, pred = probs.to(torch.float64).max(dim=1)
    correct = (pred == y).to(torch.float64)
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count.index_add_(0, bins, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, bins, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, bins, correct)
    return ((sum_acc - sum_conf).abs().sum() / conf.numel()).item()


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Σ_c (p_c − y_c)² with one-hot y, averaged over samples."""
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[1]).to(torch.float64)
    return (probs.to(torch.float64) - onehot).square().sum(dim=1).mean().item()


def classification_metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """accuracy, nll, ece and brier of one set of predictions."""
    return {
        "accuracy": accuracy(probs, y),
        "nll": nll(probs, y),
        "ece": ece(probs, y),
        "brier": brier(probs, y),
    }


def _batches(x: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of inputs, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one input row, got shape {tuple(x.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return x.split(batch_size)


@torch.no_grad()
def map_predictive(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """softmax(f(x; θ)) in eval mode; the model's train/eval state is restored."""
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([_logits(model(xb), xb).softmax(dim=-1) for xb in _batches(x, batch_size)])
    finally:
        model.train(was_training)
    return out


def _logits(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Class scores must be (batch, classes): softmax over anything else (e.g. over the batch
    of a model returning one logit per sample) would be a silently wrong distribution."""
    if f.ndim != 2 or f.shape[0] != x.shape[0]:
        raise ValueError(
            f"the model must return (batch, classes) scores, got shape {tuple(f.shape)} for "
            f"{x.shape[0]} inputs (for one logit per sample, return two columns [0, logit])"
        )
    return f


def _named_params(posterior) -> list[tuple[str, nn.Parameter]]:
    named = getattr(posterior, "named_params", None)
    if named is None:
        named = [(n, p) for n, p in posterior.model.named_parameters() if p.requires_grad]
    return list(named)


def _compute_dtype(posterior, named: list[tuple[str, nn.Parameter]]) -> torch.dtype:
    """The posterior's precision (float32/float64); float32 for half-precision models
    whose posterior does not say (half-precision eigenbases do not exist)."""
    mean = getattr(posterior, "mean", None)
    dtype = mean.dtype if isinstance(mean, torch.Tensor) else named[0][1].dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def output_jacobian(
    model: nn.Module,
    named_params: list[tuple[str, nn.Parameter]],
    x: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs f (B, C) and their Jacobian J (B, C, P) w.r.t. the flat parameters.

    P follows ``named_params`` order (the order of every (P,) vector in spamkern). With
    ``dtype``, parameters, floating buffers and floating inputs are cast to it first (a
    half-precision model evaluated in float32), without touching the model.
    """
    params: dict[str, torch.Tensor] = {n: p.detach() for n, p in named_params}
    fixed: dict[str, torch.Tensor] = {}  # cast frozen parameters and buffers, not differentiated
    if dtype is not None:
        params = {n: p.to(dtype) for n, p in params.items()}
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if n not in params and t.is_floating_point() and t.dtype != dtype:
                fixed[n] = t.detach().to(dtype)
        if x.is_floating_point():
            x = x.to(dtype)

    def f_single(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, fixed), (xi.unsqueeze(0),)).squeeze(0)
        return out, out

    jac, out = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(params, x)
    b, c = _logits(out, x).shape
    J = torch.cat([jac[n].reshape(b, c, -1) for n, _ in named_params], dim=2)
    return out, J


def glm_predictive(
    posterior, x: torch.Tensor, link: str = "probit", batch_size: int = 128
) -> torch.Tensor:
    """Laplace GLM predictive p(y | x) ≈ softmax(κ ∘ f(x)), κ_c = (1 + π/8 · Var f_c)^(−1/2).

    ``posterior`` needs ``.model`` and ``.functional_variance(J)`` ((B, C, P) →
    (B, C, C)); J is taken with torch.func w.r.t. ``posterior.named_params`` (or the
    model's trainable parameters in order). Only the probit link is implemented.

    Computed in the posterior's precision (float32 for a half-precision model: e.g. fitted
    in float32, then converted with ``model.half()``), returned in the model's dtype.
    """
    if link != "probit":
        raise ValueError(f"link must be 'probit' (the only one implemented), got {link!r}")
    if not hasattr(posterior, "functional_variance") or not hasattr(posterior, "model"):
        raise TypeError(
            "glm_predictive needs a posterior with .model and .functional_variance(J), "
            f"got {type(posterior).__name__}"
        )
    model = posterior.model
    named = _named_params(posterior)
    if not named:
        raise ValueError("the posterior has no parameters to take the Jacobian against")
    dtype = _compute_dtype(posterior, named)
    was_training = model.training
    model.eval()
    outs = []
    try:
        for xb in _batches(x, batch_size):
            with torch.no_grad():
                f, J = output_jacobian(model, named, xb, dtype)
                var = posterior.functional_variance(J)
                diag = var.diagonal(dim1=-2, dim2=-1)
                kappa = (1.0 + math.pi / 8.0 * diag.clamp_min(0)).rsqrt()
                outs.append((kappa * f).softmax(dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(outs).to(named[0][1].dtype)
