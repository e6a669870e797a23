"""The quasi-Newton pieces every fixed-point hyperparameter iteration shares: a point of
the evidence, the L-BFGS memory with its stopping test, and the ascent guard."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# iterations over which gains are compared with the evaluations' round-off
ROUNDOFF_WINDOW = 3


@dataclass
class Point:
    """The evidence at one point x (log δ, [log σ]; or one block's log δ) and what the next
    update needs there."""

    x: torch.Tensor
    value: float
    grad: torch.Tensor  # ∂E/∂x
    # the fixed-point step from x (see FixedPointHyper._mackay) and 1 / −∂²E/∂x² per group
    # (approximate), the L-BFGS preconditioner; None where ``curvature`` replaces them
    mackay: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    newton: bool = False  # ``mackay`` is the exact Newton step (scalar, layerwise)
    curvature: Any = None  # parameterwise Kronecker: a block's TensorCurvature


@dataclass
class SecantMemory:
    """One iteration's L-BFGS pairs (s, y, 1/sᵀy), the gain of each accepted step and the
    round-off seen in it."""

    size: int
    pairs: list = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)

    def learn(self, point: Point, accepted: Point) -> None:
        """Keep the step's curvature pair and its gain (the larger of the evidence difference
        and the trapezoid rule on the gradients — exact to second order and, unlike the
        difference of two evidences, free of their round-off in float32), and the gap
        between the two (the round-off)."""
        s, y = accepted.x - point.x, point.grad - accepted.grad  # y: change of ∇(−E)
        sy = torch.dot(s, y)
        if sy > 1e-12 * s.norm() * y.norm():
            self.pairs.append((s, y, 1.0 / sy))
            del self.pairs[: -self.size]
        trapezoid = 0.5 * float(torch.dot(s, point.grad) + torch.dot(s, accepted.grad))
        self.gains.append(max(accepted.value - point.value, trapezoid))
        self.noise.append(abs(accepted.value - point.value - trapezoid))

    def stalled(self, least_gain: float) -> bool:
        """Whether the iteration has stalled: the last gain below ``least_gain``, or the
        last few gains :meth:`within_roundoff`."""
        return self.gains[-1] <= least_gain or self.within_roundoff()

    def within_roundoff(self, roundoff: float = math.inf) -> bool:
        """Whether the last few gains, on average, are below the round-off of the evidence —
        measured as the gap between each step's change of the evidence and its trapezoid
        estimate from the gradients (exact to second order: in float32 the gap is the
        evaluations' round-off once steps are small; in float64 it is negligible).

        ``roundoff`` (see :func:`roundoff`) also requires the last gain to lie within the
        evidence's round-off: far from the optimum the gap is the third order of a long
        step, not round-off (a ViT's patch embedding, iterated alone, stopped 2.7 nats
        short after gains of 16, 32 and 9 nats)."""
        if len(self.gains) < ROUNDOFF_WINDOW or self.gains[-1] > roundoff:
            return False
        return sum(self.gains[-ROUNDOFF_WINDOW:]) <= sum(self.noise[-ROUNDOFF_WINDOW:])


def two_loop(grad: torch.Tensor, pairs: list, start) -> torch.Tensor:
    """The L-BFGS two-loop recursion: H grad for the inverse Hessian that ``pairs``
    (s, y, 1/sᵀy) update from ``start`` (a function applying the initial one)."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(pairs):  # in-place updates: one pass each, no temporaries
        alpha = rho * torch.dot(s, q)
        q.addcmul_(y, alpha, value=-1.0)
        alphas.append(alpha)
    r = start(q)
    for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
        r.addcmul_(s, alpha - rho * torch.dot(y, r))
    return r


def ascended(old: Point, new: Point) -> bool:
    """The guard: did the evidence not decrease from ``old`` to ``new``?

    Compared directly, or — since the evidence is concave in (log δ, log σ) — certified by a
    non-negative directional derivative at ``new`` along the step, with the values then equal
    within round-off (the sum over P log terms loses that much in float32; in float64
    the values alone decide).
    """
    if not math.isfinite(new.value):
        return False
    if new.value >= old.value:
        return True
    if torch.finfo(new.x.dtype).eps < 1e-10:  # float64: the values themselves decide
        return False
    slope = float(torch.dot(new.grad, new.x - old.x))
    return slope >= 0 and new.value >= old.value - roundoff(old.value, new.x.dtype)


def roundoff(value: float, dtype: torch.dtype) -> float:
    """The round-off allowed an evidence ``value`` computed in ``dtype``: 10³ ulps of it."""
    return 1e3 * torch.finfo(dtype).eps * (abs(value) + 1.0)
