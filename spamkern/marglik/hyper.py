"""Hyperparameter updates of the marginal-likelihood step: prior precisions (and σ) at fixed θ.

Two methods behind one interface (``make_hyper_optimizer(...).step(posterior)``):

* ``"adam"``: a fixed number of Adam steps on −log p(D | δ)/N w.r.t. log δ (and log σ);
  its moments persist across marglik steps, as in the paper's loop.
* ``"fixed-point"``: MacKay's update. At fixed θ*, the evidence is stationary in a group g of
  entries sharing one precision when δ_g ‖θ_g‖² = γ_g, γ_g = Σ_{i∈g} (1 − δ_i Σ_ii) the
  group's effective number of parameters (Σ = Π⁻¹). Each iteration moves log δ_g towards
  log(γ_g / ‖θ_g‖²) — a Newton step on that equation, bounded — and σ² towards
  2·s·L·σ² / (N·C − γ_total) for regression. Every update is an ascent direction of the
  evidence; it is accepted only if the evidence does not decrease (otherwise halved), and
  the iteration stops once an iteration gains less than ``tol`` per data point.

See docs/hyperparameters.md for the update rules and when to pick which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior.priors import Prior

HYPER_OPTIMIZERS = ("fixed-point", "adam")


def _check_finite(value: torch.Tensor, prior: Prior, log_sigma: torch.Tensor | None) -> None:
    finite = bool(torch.isfinite(value)) and bool(torch.isfinite(prior.log_precision).all())
    if log_sigma is not None:
        finite = finite and bool(torch.isfinite(log_sigma))
    if not finite:
        raise ValueError(
            "the marginal likelihood or the hyperparameters became non-finite during the "
            "hyperparameter update; lower lr_hyp / n_hypersteps or use hyper_optimizer="
            "'fixed-point'"
        )


class AdamHyper:
    """``n_steps`` Adam steps (lr ``lr``) on −log p(D | δ)/N per call; moments kept between
    calls and in :meth:`state_dict`, so a resumed run continues bit for bit."""

    method = "adam"

    def __init__(
        self, prior: Prior, log_sigma: torch.Tensor | None, learn_sigma: bool, lr, n_steps
    ):
        self.prior = prior
        self.log_sigma = log_sigma
        self.learn_sigma = learn_sigma
        self.n_steps = n_steps
        params = [prior.log_precision] + ([log_sigma] if learn_sigma else [])
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.n_evaluations = 0

    def _sigma_arg(self) -> torch.Tensor | None:
        return self.log_sigma if self.learn_sigma else None

    def step(self, posterior: LaplacePosterior) -> float:
        n = posterior.n_data
        for _ in range(self.n_steps):
            self.optimizer.zero_grad(set_to_none=True)
            value = posterior.log_evidence(self.prior.log_precision, self._sigma_arg())
            (-value / n).backward()
            self.optimizer.step()
        with torch.no_grad():
            value = posterior.log_evidence(self.prior.log_precision, self._sigma_arg())
        self.n_evaluations = self.n_steps + 1
        _check_finite(value, self.prior, self._sigma_arg())
        if self.learn_sigma:
            posterior.log_sigma = self.log_sigma.detach().clone()
        return float(value)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_method(state, self.method)
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass
class _Point:
    """The evidence at one (log δ, log σ) and what the next update needs from there."""

    log_precision: torch.Tensor
    log_sigma: torch.Tensor | None
    value: float
    gamma: torch.Tensor | None = None  # per hyperparameter: Σ_{i∈g} (1 − δ_i Σ_ii)
    scatter: torch.Tensor | None = None  # per hyperparameter: Σ_{i∈g} δ_i θ_i²
    sigma_fit: float | None = None  # 2·s·L (regression)
    sigma_dof: float | None = None  # N·C − γ_total (regression)


class FixedPointHyper:
    """MacKay fixed-point iteration with an evidence guard (see the module docstring)."""

    method = "fixed-point"

    def __init__(
        self,
        prior: Prior,
        log_sigma: torch.Tensor | None,
        learn_sigma: bool,
        n_steps: int,
        tol: float,
        max_log_step: float = 3.0,
        log_bounds: tuple[float, float] = (-30.0, 30.0),
    ):
        self.prior = prior
        self.log_sigma = log_sigma
        self.learn_sigma = learn_sigma
        self.n_steps = n_steps
        self.tol = tol
        self.max_log_step = max_log_step
        self.log_bounds = log_bounds
        self.n_evaluations = 0
        self.n_iterations = 0
        self._count = self._group_sums(
            torch.ones(
                prior.n_params, dtype=prior.log_precision.dtype, device=prior.log_precision.device
            )
        )
        self._share = self._shared_fraction()

    # -- group bookkeeping -----------------------------------------------------------------
    def _group_sums(self, per_param: torch.Tensor) -> torch.Tensor:
        """Σ_{i∈g} per_param_i for every hyperparameter g (the adjoint of the expansion)."""
        with torch.enable_grad():
            lp = self.prior.log_precision.detach().requires_grad_(True)
            total = (self.prior.log_precision_diag(lp) * per_param.detach()).sum()
            (grad,) = torch.autograd.grad(total, lp)
        return grad

    def _shared_fraction(self) -> torch.Tensor:
        """1/2 for unitwise a and b (each entry's δ moves with both), 1 elsewhere."""
        share = torch.ones_like(self.prior.log_precision.detach())
        if self.prior.kind == "unitwise":
            for slot in self.prior.slots:
                if len(slot.shape) >= 2:
                    share[slot.start : slot.stop] = 0.5
        return share

    # -- one evaluation ----------------------------------------------------------------------
    def _evaluate(self, posterior, lp: torch.Tensor, ls: torch.Tensor | None, grad: bool):
        if not grad:
            with torch.no_grad():
                return _Point(lp, ls, float(posterior.log_evidence(lp, self._arg(ls))))
        lp = lp.detach().requires_grad_(True)
        ls_var = None if ls is None else ls.detach().requires_grad_(self.learn_sigma)
        value = posterior.log_evidence(lp, self._arg(ls_var))
        inputs = [lp] + ([ls_var] if self.learn_sigma else [])
        grads = torch.autograd.grad(value, inputs)
        with torch.no_grad():
            theta2 = posterior.mean.square()
            scatter = self._group_sums(self.prior.precision_diag(lp.detach()) * theta2)
            gamma = 2.0 * grads[0] + scatter  # ∂E/∂log δ_g = ½ (γ_g − δ_g ‖θ_g‖²)
        point = _Point(lp.detach(), ls, float(value.detach()), gamma, scatter)
        if self.learn_sigma:  # ∂E/∂log σ = 2sL − (N·C − γ_total)
            fit = float(2.0 * posterior._scale(ls) * posterior.curvature.loss)
            point.sigma_fit, point.sigma_dof = fit, fit - float(grads[1])
        return point

    def _arg(self, ls):
        return ls if self.learn_sigma else None

    # -- the update --------------------------------------------------------------------------
    def _direction(self, point: _Point) -> tuple[torch.Tensor, float]:
        """Newton step on log δ_g = log(γ_g / ‖θ_g‖²) (and σ's fixed point), bounded.

        Its sign is the sign of ∂E/∂log δ_g, so it is an ascent direction. The divisor
        2 − γ_g/n_g approximates 1 − d log γ_g / d log δ_g: about 1 when the data determine
        the group (the plain MacKay step), about 2 when the prior does (where the plain step
        oscillates)."""
        gamma = point.gamma.clamp_min(0.0)
        log_ratio = _safe_log_ratio(gamma, point.scatter)
        fraction = (gamma / self._count.clamp_min(1.0)).clamp(0.0, 1.0)
        step = log_ratio / (2.0 - fraction) * self._share
        step = step.clamp(-self.max_log_step, self.max_log_step)
        sigma_step = 0.0
        if self.learn_sigma:
            dof = max(point.sigma_dof, 1e-12)
            sigma_step = 0.5 * math.log(max(point.sigma_fit, 1e-300) / dof)
            sigma_step = max(-self.max_log_step, min(self.max_log_step, sigma_step))
        return step, sigma_step

    def step(self, posterior: LaplacePosterior) -> float:
        lp0 = self.prior.log_precision.detach().clone()
        ls0 = self.log_sigma.detach().clone() if self.log_sigma is not None else None
        if ls0 is None and posterior.likelihood == "regression":
            ls0 = posterior.log_sigma.detach().clone()
        point = self._evaluate(posterior, lp0, ls0, grad=True)
        evaluations, iterations = 1, 0
        scale = self.tol * posterior.n_data
        lo, hi = self.log_bounds
        while iterations < self.n_steps:
            step, sigma_step = self._direction(point)
            t, accepted = 1.0, None
            for _ in range(20):  # halve until the evidence does not decrease
                lp = (point.log_precision + t * step).clamp(min(lo, lp0.min()), max(hi, lp0.max()))
                ls = None if ls0 is None else point.log_sigma + t * sigma_step
                candidate = self._evaluate(posterior, lp, ls, grad=True)
                evaluations += 1
                if math.isfinite(candidate.value) and candidate.value >= point.value:
                    accepted = candidate
                    break
                t *= 0.5
            iterations += 1
            if accepted is None:  # no ascent left at round-off level
                break
            gain = accepted.value - point.value
            point = accepted
            if gain <= scale:
                break
        with torch.no_grad():
            self.prior.log_precision.copy_(point.log_precision)
            if self.learn_sigma:
                self.log_sigma.copy_(point.log_sigma)
                posterior.log_sigma = point.log_sigma.clone()
        self.n_evaluations, self.n_iterations = evaluations, iterations
        value = torch.tensor(point.value)
        _check_finite(value, self.prior, self.log_sigma if self.learn_sigma else None)
        return point.value

    def state_dict(self) -> dict[str, Any]:
        """Nothing carries over between calls: the iteration restarts from the prior."""
        return {"method": self.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_method(state, self.method)


def _safe_log_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """log(num/den) with 0/0 → 0, x/0 → +inf, 0/x → −inf (clamped by the caller)."""
    out = num.log() - den.log()
    return torch.where((num <= 0) & (den <= 0), torch.zeros_like(out), out)


def _check_method(state: dict[str, Any], method: str) -> None:
    if not isinstance(state, dict) or state.get("method") != method:
        got = state.get("method") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"this state belongs to hyper optimizer {got!r}, not {method!r}")


def make_hyper_optimizer(
    method: str,
    prior: Prior,
    *,
    log_sigma: torch.Tensor | None = None,
    learn_sigma: bool = False,
    lr: float = 0.1,
    n_steps: int = 100,
    tol: float = 1e-7,
):
    """The hyperparameter optimiser of a marglik step.

    ``.step(posterior)`` optimises the evidence of a fitted posterior at fixed θ, writes the
    result into ``prior.log_precision`` (and ``log_sigma`` when ``learn_sigma``) in place and
    returns the final log marginal likelihood. ``"adam"`` takes ``n_steps`` steps of rate
    ``lr``; ``"fixed-point"`` iterates at most ``n_steps`` times and stops once an iteration
    gains less than ``tol`` (log evidence per data point). ``state_dict``/``load_state_dict``
    carry what a resumed run needs.
    """
    if method not in HYPER_OPTIMIZERS:
        raise ValueError(f"hyper_optimizer must be one of {HYPER_OPTIMIZERS}, got {method!r}")
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be a spamkern Prior, got {type(prior).__name__}")
    if learn_sigma and not isinstance(log_sigma, torch.Tensor):
        raise ValueError("learn_sigma=True needs the log_sigma tensor to update")
    if isinstance(log_sigma, torch.Tensor) and log_sigma.ndim != 0:
        raise ValueError(f"log_sigma must be a 0-d tensor, got shape {tuple(log_sigma.shape)}")
    if not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an integer >= 0, got {n_steps!r}")
    if not lr > 0 or not tol >= 0:
        raise ValueError(f"lr must be > 0 and tol >= 0, got lr={lr}, tol={tol}")
    if method == "adam":
        return AdamHyper(prior, log_sigma, learn_sigma, lr, n_steps)
    return FixedPointHyper(prior, log_sigma, learn_sigma, n_steps, tol)
