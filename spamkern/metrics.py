"""Classification metrics and the two predictives they are computed on (SPEC §8).

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
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C) class probabilities, got {tuple(probs.shape)}")
    if y.ndim != 1 or y.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {probs.shape[0]} matching probs, got {tuple(y.shape)}"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")


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
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
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
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return x.split(batch_size)


@torch.no_grad()
def map_predictive(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """softmax(f(x; θ)) in eval mode; the model's train/eval state is restored."""
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([model(xb).softmax(dim=-1) for xb in _batches(x, batch_size)])
    finally:
        model.train(was_training)
    return out


def _named_params(posterior) -> list[tuple[str, nn.Parameter]]:
    named = getattr(posterior, "named_params", None)
    if named is None:
        named = [(n, p) for n, p in posterior.model.named_parameters() if p.requires_grad]
    return list(named)


def output_jacobian(
    model: nn.Module, named_params: list[tuple[str, nn.Parameter]], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs f (B, C) and their Jacobian J (B, C, P) w.r.t. the flat parameters.

    P follows ``named_params`` order (the order of every (P,) vector in spamkern).
    """
    params = {n: p.detach() for n, p in named_params}

    def f_single(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)
        return out, out

    jac, out = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(params, x)
    b, c = out.shape
    J = torch.cat([jac[n].reshape(b, c, -1) for n, _ in named_params], dim=2)
    return out, J


def glm_predictive(
    posterior, x: torch.Tensor, link: str = "probit", batch_size: int = 128
) -> torch.Tensor:
    """Laplace GLM predictive p(y | x) ≈ softmax(κ ∘ f(x)), κ_c = (1 + π/8 · Var f_c)^(−1/2).

    ``posterior`` needs ``.model`` and ``.functional_variance(J)`` ((B, C, P) →
    (B, C, C)); J is taken with torch.func w.r.t. ``posterior.named_params`` (or the
    model's trainable parameters in order). Only the probit link is implemented.
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
    was_training = model.training
    model.eval()
    outs = []
    try:
        for xb in _batches(x, batch_size):
            with torch.no_grad():
                f, J = output_jacobian(model, named, xb)
                var = posterior.functional_variance(J)
                diag = var.diagonal(dim1=-2, dim2=-1)
                kappa = (1.0 + math.pi / 8.0 * diag.clamp_min(0)).rsqrt()
                outs.append((kappa * f).softmax(dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(outs)
