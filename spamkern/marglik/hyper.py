"""Hyperparameter updates of the marginal-likelihood step: prior precisions (and σ) at fixed θ.

Two methods behind one interface (``make_hyper_optimizer(...).step(posterior)``):

* ``"adam"``: a fixed number of Adam steps on −log p(D | δ)/N w.r.t. log δ (and log σ);
  its moments persist across marglik steps, as in the paper's loop.
* ``"fixed-point"``: MacKay's update. At fixed θ*, the evidence is stationary in a group g of
  entries sharing one precision when δ_g ‖θ_g‖² = γ_g, γ_g = Σ_{i∈g} (1 − δ_i Σ_ii) the
  group's effective number of parameters (Σ = Π⁻¹). Each iteration moves log δ_g towards
  log(γ_g / ‖θ_g‖²) — a Newton step on that equation, bounded — and σ² towards
  2·s·L·σ² / (N·C − γ_total) for regression; after the first step an L-BFGS direction,
  preconditioned by the per-group curvature, replaces it while it points uphill.
  Scalar and layerwise evidences (at fixed σ) split into one term per tensor whose exact
  curvature comes with each closed-form evaluation, so there every step is the exact
  Newton step in log δ instead (quadratic convergence: measured on an MLP 784-256-256-10
  in 4-epoch SpaM training, 20 layerwise evaluations per run → 14–15).
  Parameterwise Kronecker posteriors couple every entry of a block through the projected
  δ̃ but no two blocks, so there (at fixed σ) each block runs its own iteration
  (:mod:`spamkern.marglik.blockwise`), starting from, and with L-BFGS building on, the
  curvature along shifts of whole tensors, rows and columns
  (:mod:`spamkern.marglik.shift_preconditioner`) — until a step overshoots, when plain
  L-BFGS takes over. Every update is an ascent direction of
  the evidence; it is accepted only if the evidence does not decrease (otherwise halved),
  and the iteration stops once an iteration gains less than ``tol`` per data point
  (default 10⁻⁶: 0.004 nats at N = 4096, far below any difference between priors worth
  acting on) or the last three gains are no larger than the evidence's own round-off
  (every evidence the iteration evaluates sums its log terms in float64, but an
  evidence whose log det comes in float32 — learned σ, through the packed log det of
  the other priors — scatters by ~10⁻⁵ of its value between nearby points; iterating
  below that only wanders). For unitwise Kronecker posteriors each full step is followed by up
  to three cheap ones that hold the columns of the blocks with the largest input-side
  factor, whose evaluations reuse the cached decomposition of that factor; once those
  converge, the held columns move alone (only that factor is decomposed again).

See docs/hyperparameters.md for the update rules and when to pick which.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from spamkern.marglik.blockwise import BlockwiseShiftUpdate
from spamkern.marglik.quasi_newton import Point, SecantMemory, ascended, two_loop
from spamkern.marglik.shift_preconditioner import FLAT_CURVATURE, ShiftPreconditioner
from spamkern.ops.reductions import all_finite
from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior.priors import Prior

HYPER_OPTIMIZERS = ("fixed-point", "adam")
# the fixed-point update's default stopping tolerance: log evidence gained per data point
DEFAULT_TOL = 1e-6
# unitwise: steps that hold the largest input-side factors after each full step
_CHEAP_STEPS = 3


def _check_finite(value: torch.Tensor, prior: Prior, log_sigma: torch.Tensor | None) -> None:
    finite = bool(torch.isfinite(value)) and all_finite(prior.log_precision)
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


class FixedPointHyper:
    """MacKay fixed-point steps, accelerated and guarded (see the module docstring)."""

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
        memory: int = 5,
    ):
        self.prior = prior
        self.log_sigma = log_sigma
        self.learn_sigma = learn_sigma
        self.n_steps = n_steps
        self.tol = tol
        self.max_log_step = max_log_step
        self.log_bounds = log_bounds
        self.memory = memory
        self.n_evaluations = 0
        self.n_iterations = 0
        self.history: list[tuple[int, float, float]] = []  # (evaluations, seconds, evidence)
        self.block_evaluations: list[int] = []  # parameterwise Kronecker: per block
        lp = prior.log_precision
        self._count = prior.group_sums(torch.ones(prior.n_params, dtype=lp.dtype, device=lp.device))
        self._share = self._shared_fraction()
        self._shifts = ShiftPreconditioner(prior) if prior.kind == "parameterwise" else None

    # -- group bookkeeping -----------------------------------------------------------------
    def _shared_fraction(self) -> torch.Tensor:
        """1/2 for unitwise a and b (each entry's δ moves with both), 1 elsewhere."""
        share = torch.ones_like(self.prior.log_precision.detach())
        if self.prior.kind == "unitwise":
            for slot in self.prior.slots:
                if len(slot.shape) >= 2:
                    share[slot.start : slot.stop] = 0.5
        return share

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.prior.log_precision.numel()
        return x[:n], (x[n] if self.learn_sigma else None)

    # -- one evaluation ----------------------------------------------------------------------
    def _evaluate(self, posterior: LaplacePosterior, x: torch.Tensor) -> Point:
        """The evidence at ``x`` and the step the iteration starts from there."""
        x = x.detach()
        lp, ls = self._split(x)
        exact = None
        if not self.learn_sigma:  # in closed form; autograd only where σ is learned too
            value, grad, scatter, _, exact = posterior.closed_form_evidence_and_gradient(lp)
        else:
            x.requires_grad_(True)
            lp, ls = self._split(x)
            value = posterior.log_evidence(lp, ls)
            (grad,) = torch.autograd.grad(value, x)
            scatter = self.prior.group_sums(self.prior.precision_diag(lp) * posterior.mean.square())
        if exact is not None:  # scalar, layerwise: Newton on the exact curvature
            tiny = torch.finfo(exact.dtype).tiny
            curvature = torch.maximum(exact, FLAT_CURVATURE * exact.max().clamp_min(tiny))
            return Point(x, float(value), grad, grad / curvature, 1 / curvature, newton=True)
        with torch.no_grad():
            gamma = 2.0 * grad[: lp.numel()] + scatter  # ∂E/∂log δ_g = ½ (γ_g − δ_g ‖θ_g‖²)
            step, scale = self._mackay(gamma, scatter)
            if self.learn_sigma:  # ∂E/∂log σ = 2sL − (N·C − γ_total)
                fit = 2.0 * posterior._scale(ls) * posterior.curvature.loss
                dof = fit - grad[-1]
                s_step, s_scale = _log_step(fit, dof)
                step = torch.cat([step, (0.5 * s_step).reshape(1)])
                scale = torch.cat([scale, (0.5 * s_scale).reshape(1)])
        return Point(x.detach(), float(value.detach()), grad, step, scale)

    def _mackay(self, gamma: torch.Tensor, scatter: torch.Tensor):
        """Newton step on log δ_g = log(γ_g / ‖θ_g‖²), and its ratio to ∂E/∂log δ_g.

        Same sign as the gradient, so an ascent direction. The divisor 2 − γ_g/n_g
        approximates 1 − d log γ_g / d log δ_g: about 1 when the data determine the group
        (the plain MacKay step), about 2 when the prior does (where the plain step
        oscillates). Also returns 1 / −∂²E/∂(log δ_g)² (approximate), the diagonal from which
        the quasi-Newton acceleration starts, its curvature floored at ``FLAT_CURVATURE``
        times the largest group's: a group the data do not use (the bias of a dead unit)
        has a flat evidence, curvature ~10⁻¹⁷ and a float32 gradient of pure round-off, and
        unfloored its 10¹⁷ scale drove the L-BFGS scaling and every direction with it
        (LeNet on the 8×8 digits: 206 unitwise evaluations in six marglik steps instead of
        83). A floor of 10⁻⁶ keeps round-off moves of such groups below ~0.1 in log δ."""
        step, _ = _log_step(gamma, scatter)
        gamma = gamma.clamp_min(0.0)
        fraction = (gamma / self._count.clamp_min(1.0)).clamp(0.0, 1.0)
        damp = self._share / (2.0 - fraction)
        # −∂²E/∂(log δ_g)² ≈ ½ (γ_g (1 − γ_g/n_g) + δ_g‖θ_g‖²) (entries' γ_i taken equal)
        curvature = 0.5 * (gamma * (1.0 - fraction) + scatter)
        floor = FLAT_CURVATURE * curvature.max().clamp_min(torch.finfo(gamma.dtype).tiny)
        return step * damp, self._share / torch.maximum(curvature, floor)

    # -- the iteration -----------------------------------------------------------------------
    def _x0(self, posterior: LaplacePosterior) -> torch.Tensor:
        lp = self.prior.log_precision.detach()
        if not self.learn_sigma:
            return lp.clone()
        return torch.cat([lp, self.log_sigma.detach().reshape(1).to(lp)])

    def _direction(
        self, point: Point, pairs: list, diagonal: bool, side: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L-BFGS direction; the MacKay step first and whenever that is not uphill.

        ``diagonal``: start from the per-group curvature of :meth:`_mackay` (fastest where
        the groups are nearly independent), else from a multiple of the identity
        (parameterwise Kronecker blocks with σ learned, where the per-block update of
        :mod:`spamkern.marglik.blockwise` does not apply: the per-entry curvature misleads)

        ``side`` (a 0/1 mask and a fallback scale, see :meth:`_cheap_side`) restricts the
        step to the mask's entries; its MacKay fallback is then the whole coordinate step of
        a row whose columns are held, or of a column whose rows are (not the half that a
        row and a column moving together each take)."""
        if point.newton:
            return point.mackay.clamp(-self.max_log_step, self.max_log_step)

        def start(q: torch.Tensor) -> torch.Tensor:
            if not pairs:
                return point.scale * q
            s_last, y_last, _ = pairs[-1]  # scaled to the curvature of the last step
            scale = point.scale if diagonal else torch.ones_like(point.scale)
            return scale * q * (torch.dot(s_last, y_last) / torch.dot(y_last, scale * y_last))

        r = two_loop(point.grad, pairs, start).clamp(-self.max_log_step, self.max_log_step)
        if side is not None:
            r = r * side[0]
        if not pairs or not bool(torch.dot(r, point.grad) > 0):
            pairs.clear()
            r = point.mackay if side is None else point.mackay * side[0] * side[1]
            r = r.clamp(-self.max_log_step, self.max_log_step)
        return r

    def _x_share(self) -> torch.Tensor:
        """:attr:`_share` over x (σ, when learned, is not shared)."""
        share = self._share
        return share if not self.learn_sigma else torch.cat([share, share.new_ones(1)])

    def _cheap_side(self, posterior: LaplacePosterior):
        """Unitwise Kronecker posteriors: the two sides of the hyperparameters, each as (a
        0/1 mask over x, the MacKay fallback's scale), or None otherwise.

        The cheap side is everything except the columns b of the blocks with the largest
        input-side factor — in·kernel positions; the held side is those columns alone. A
        step within the cheap side leaves those blocks' whitened Ã — and their cached
        decompositions of it — as they were, so its evaluation skips the most expensive
        decompositions (the 784 × 784 first-layer Ã of an MLP on 28×28 inputs dominates a
        full evaluation); a step within the held side skips all the others. The fallback
        scale is 2 where a row or column moves while its partner is held (the whole
        coordinate step, not the half that a row and a column moving together each take).
        Measured on an MLP 784-256-256-10 in 4-epoch SpaM training: three cheap steps after
        each full one took about a fifth less hyperparameter time than the earlier one
        rows-only step (every block's columns held) after each full one, at the same
        evidence; alternating rows-only and columns-only steps needed twice the
        evaluations."""
        if self.prior.kind != "unitwise" or posterior.structure != "kron":
            return None
        matrices = [slot for slot in self.prior.slots if len(slot.shape) >= 2]
        if not matrices:
            return None
        widest = max(slot.cols * slot.positions for slot in matrices)
        mask = torch.ones_like(self._x_share())
        scale = torch.ones_like(mask)
        for slot in matrices:
            if slot.cols * slot.positions == widest:
                mask[slot.start + slot.rows : slot.stop] = 0.0
                scale[slot.start : slot.start + slot.rows] = 2.0  # 1 / the shared half
        held_scale = torch.where(mask == 0.0, 2.0, 1.0)
        return (mask, scale), (1.0 - mask, held_scale)

    def _guarded_step(self, posterior, point: Point, direction: torch.Tensor, bounds):
        """(the first of x + d, x + d/2, … whose evidence is not lower, or None; evaluations)."""
        lo, hi = bounds
        for tried in range(1, 13):
            x = torch.clamp(point.x + direction, lo, hi)
            candidate = self._evaluate(posterior, x)
            if ascended(point, candidate):
                return candidate, tried
            direction = 0.5 * direction
        return None, tried

    def _bounds(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log δ within ``log_bounds`` (or where it already is); σ unbounded."""
        lo, hi = x0.clone(), x0.clone()
        n = self.prior.log_precision.numel()
        lo[:n] = x0[:n].clamp_max(self.log_bounds[0])
        hi[:n] = x0[:n].clamp_min(self.log_bounds[1])
        lo[n:], hi[n:] = -math.inf, math.inf
        return lo, hi

    def _write_back(self, posterior: LaplacePosterior, x: torch.Tensor, value: float) -> None:
        lp, ls = self._split(x)
        with torch.no_grad():
            self.prior.log_precision.copy_(lp)
            if self.learn_sigma:
                self.log_sigma.copy_(ls)
                posterior.log_sigma = ls.clone()
        _check_finite(torch.tensor(value), self.prior, self.log_sigma if self.learn_sigma else None)

    def _blockwise_step(self, posterior: LaplacePosterior, x0: torch.Tensor, bounds) -> float:
        """Parameterwise Kronecker posteriors at fixed σ: one iteration per block (see
        :mod:`spamkern.marglik.blockwise`)."""
        self._shifts.new_posterior([b.side_costs()[0] for b in posterior.curvature_blocks])
        update = BlockwiseShiftUpdate(
            self._shifts, self.n_steps, self.tol * posterior.n_data, self.max_log_step, self.memory
        )
        x, value = update.run(posterior, x0, bounds)
        self.history, self.block_evaluations = update.history, update.block_evaluations
        self.n_evaluations, self.n_iterations = update.n_evaluations, update.n_iterations
        self._write_back(posterior, x, value)
        return value

    def step(self, posterior: LaplacePosterior) -> float:
        x0 = self._x0(posterior)
        bounds = self._bounds(x0)
        if self._shifts is not None and posterior.structure == "kron" and not self.learn_sigma:
            return self._blockwise_step(posterior, x0, bounds)
        tic = time.perf_counter()
        point = self._evaluate(posterior, x0)
        self.history = [(1, time.perf_counter() - tic, point.value)]
        diagonal = not (self.prior.kind == "parameterwise" and posterior.structure == "kron")
        schedule = _CheapSchedule(self._cheap_side(posterior))
        memory = SecantMemory(self.memory)
        pairs = memory.pairs
        evaluations = iterations = 0
        while iterations < self.n_steps:
            iterations += 1
            direction = self._direction(point, pairs, diagonal, schedule.side)
            if not all_finite(direction):  # never silently stop short on a broken step
                raise RuntimeError(
                    "the fixed-point hyperparameter update produced a non-finite direction "
                    f"at a finite gradient (prior {self.prior.kind!r}); use "
                    "hyper_optimizer='adam' and report this"
                )
            accepted, tried = None, 0
            # skip when the first-order gain of a full step is below the tolerance
            if float(torch.dot(direction, point.grad)) > self.tol * posterior.n_data:
                accepted, tried = self._guarded_step(posterior, point, direction, bounds)
                evaluations += tried
            if accepted is None:  # no ascent left (at round-off level) along this direction
                if schedule.side is None:
                    break
                schedule.skip()
                if schedule.done:
                    break
                continue
            memory.learn(point, accepted)
            point = accepted
            self.history.append((evaluations + 1, time.perf_counter() - tic, point.value))
            stalled = memory.stalled(self.tol * posterior.n_data)
            if stalled and schedule.side is None:
                break
            schedule.advance(stalled)
            if schedule.done:
                break
        self._write_back(posterior, point.x, point.value)
        self.n_evaluations, self.n_iterations = evaluations + 1, iterations
        return point.value

    def state_dict(self) -> dict[str, Any]:
        """Nothing carries over between calls: the iteration restarts from the prior."""
        return {"method": self.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_method(state, self.method)


class _CheapSchedule:
    """Which hyperparameters the next step moves (unitwise Kronecker posteriors: see
    :meth:`FixedPointHyper._cheap_side`; otherwise always all of them, ``side`` None).

    After a full step, up to ``_CHEAP_STEPS`` steps of the cheap side, then a full step
    again. Once the cheap side has converged (a step of it stalled, or its direction
    promised less than the tolerance), what is left to gain lies in the held side, so the
    next step moves that side alone — the cost of its decomposition only — and then the
    cheap side again. Both sides converged in turn is convergence of the whole (each at
    its optimum given the other, to the tolerance): :attr:`done`."""

    def __init__(self, sides):
        self.cheap, self.held = sides if sides is not None else (None, None)
        self.side = None
        self.count = 0
        self.cheap_converged = False
        self.done = False

    def advance(self, stalled: bool) -> None:
        """After an accepted step (``stalled``: it gained less than the tolerance)."""
        if self.cheap is None:
            return
        if self.side is None:
            self.side, self.count, self.cheap_converged = self.cheap, 1, False
        elif self.side is self.cheap:
            self._after_cheap(stalled)
        else:
            self._after_held(stalled)

    def skip(self) -> None:
        """The side's direction promised less than the tolerance: that side has converged."""
        if self.side is self.cheap:
            self._after_cheap(True)
        elif self.side is self.held:
            self._after_held(True)

    def _after_cheap(self, stalled: bool) -> None:
        if stalled:
            self.side, self.cheap_converged = self.held, True
        elif self.count < _CHEAP_STEPS:
            self.count += 1
        else:
            self.side = None

    def _after_held(self, stalled: bool) -> None:
        self.done = stalled and self.cheap_converged
        self.side, self.count, self.cheap_converged = self.cheap, 1, False


def effective_parameters(
    posterior: LaplacePosterior, log_precision: torch.Tensor | None = None
) -> torch.Tensor:
    """γ_g = Σ_{i∈g} (1 − δ_i Σ_ii) for every hyperparameter g of the posterior's prior.

    The effective number of parameters each prior precision governs, from one gradient of the
    log det (∂ log det Π / ∂ log δ_g = Σ_{i∈g} δ_i Σ_ii) — no covariance diagonal needed.
    """
    lp = posterior.prior.log_precision if log_precision is None else log_precision
    with torch.enable_grad():
        lp = lp.detach().requires_grad_(True)
        (dlogdet,) = torch.autograd.grad(posterior.log_det_posterior_precision(lp), lp)
        log_delta = posterior.prior.log_precision_diag(lp)
        (count,) = torch.autograd.grad(log_delta.sum(), lp)
    return count - dlogdet


def _log_step(num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log(num/den), log(num/den) / (num − den)) for num, den ≥ 0, elementwise.

    The second is 1 / the logarithmic mean of num and den: finite and positive wherever
    either is positive, so step = ratio · (num − den) keeps the sign of num − den."""
    num, den = num.clamp_min(0.0), den.clamp_min(0.0)
    tiny = torch.finfo(num.dtype).tiny
    log_ratio = num.clamp_min(tiny).log() - den.clamp_min(tiny).log()
    diff = num - den
    close = diff.abs() <= 1e-8 * torch.maximum(num, den).clamp_min(tiny)
    mean = torch.maximum(num, den).clamp_min(tiny)  # logarithmic mean ≈ either when close
    ratio = torch.where(close, mean.reciprocal(), log_ratio / torch.where(close, 1.0, diff))
    step = torch.where(close, diff * ratio, log_ratio)
    return step, ratio


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
    tol: float = DEFAULT_TOL,
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
    if not lr > 0 or not 0 <= tol < math.inf:
        raise ValueError(f"lr must be > 0 and tol finite and >= 0, got lr={lr}, tol={tol}")
    if method == "adam":
        return AdamHyper(prior, log_sigma, learn_sigma, lr, n_steps)
    return FixedPointHyper(prior, log_sigma, learn_sigma, n_steps, tol)
