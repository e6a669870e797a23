"""The best constant shift of one block's log δ, fitted inside a parameterwise evaluation.

Shifting all of a block's log δ by t scales its projected precisions δ̃ = S1ᵀ D S2 by e^t
(the projection is linear), so once an evaluation has projected D, the block's share of the
evidence along that shift,

    h(t) = −½ (Σ_ab log(s·P_ab + e^t δ̃_ab) − n·t + e^t·S),    S = Σ_i δ_i θ_i²,

costs entry-wise passes only, no further matrix product. h is concave (−h'' = ½(Σ ρ(1 − ρ)
+ e^t S) > 0 with ρ = e^t δ̃/(s·P + e^t δ̃)), so a bracketed Newton iteration on h' finds its
maximum in a few passes, and the evaluation then goes on at the shifted point: its
gradient, log det and curvatures are those of log δ + t, exactly.

Why: in the parameterwise update the whole-block shift is the direction the quasi-Newton
model predicts worst. Measured on an MLP 784-256-256-10 in 4-epoch SpaM training (exact GGN),
the first step of each later marglik step moved the 256 × 784 first layer's log δ by a mean
of 0.45–0.9 and the next one corrected that mean by 0.1–0.2 more — a whole evaluation of
the block's four products spent on one number that these passes fit exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from spamkern.ops.parameterwise import shift_sums

# Newton iterations of one fit (each one pass over the block; 3–5 are typical)
MAX_ITERATIONS = 30
# a fit ends once its Newton step promises less than this fraction of ``least_gain``
CONVERGED_FRACTION = 1e-2


@dataclass(frozen=True)
class ShiftTarget:
    """What a block's fit needs besides its projection: S = Σ δθ² at t = 0, the number n of
    its entries, the range [lo, hi] ∋ 0 of t that keeps every log δ within its bounds, and
    ``least_gain``: a shift promising less is not taken (t = 0)."""

    scatter: float
    count: int
    lo: float
    hi: float
    least_gain: float

    def __post_init__(self):
        if not self.lo <= 0.0 <= self.hi:
            raise ValueError(f"the shift range must contain 0, got [{self.lo}, {self.hi}]")


def best_shift(
    target: ShiftTarget, projected: torch.Tensor, products: torch.Tensor, scale: float
) -> float:
    """The t in [lo, hi] maximising h (see the module docstring) for projected precisions
    δ̃ (``projected``) and eigenvalue products P; 0 when a Newton step from 0 promises less
    than ``target.least_gain``."""
    t, lo, hi = 0.0, target.lo, target.hi
    tolerance = target.least_gain
    for _ in range(MAX_ITERATIONS):
        slope, curvature = _derivatives(target, projected, products, scale, t)
        if slope > 0:
            lo = t
        else:
            hi = t
        if not curvature > 0 or slope * slope <= 2.0 * curvature * tolerance:
            break
        tolerance = CONVERGED_FRACTION * target.least_gain
        step = _inside(t + slope / curvature, lo, hi, target)
        if step == t:  # at a bound the share still rises beyond, or the bracket is closed
            break
        t = step
    return t


def _inside(step: float, lo: float, hi: float, target: ShiftTarget) -> float:
    """A Newton step kept inside the bracket [lo, hi]: past an end that is the range's own
    bound, that bound (the maximum may lie there: one pass decides, where bisecting towards
    it would take dozens); past an inner end, the bracket's midpoint."""
    if lo < step < hi:
        return step
    if step >= hi and hi == target.hi:
        return hi
    if step <= lo and lo == target.lo:
        return lo
    return 0.5 * (lo + hi)


def _derivatives(target: ShiftTarget, projected, products, scale: float, t: float):
    """(h'(t), −h''(t))."""
    factor = math.exp(t)
    rho, rho_squared = shift_sums(projected, products, scale, factor).tolist()
    scatter = factor * target.scatter
    slope = -0.5 * (rho - target.count + scatter)
    return slope, 0.5 * (rho - rho_squared + scatter)


@dataclass(frozen=True)
class ShiftPolicy:
    """Fit every evaluated block's best shift: log δ stays within [``lower``, ``upper``]
    (flat, laid out like the prior's hyperparameters) and a shift promising less than
    ``least_gain`` is not taken."""

    lower: torch.Tensor
    upper: torch.Tensor
    least_gain: float
    _limits: dict = field(default_factory=dict, compare=False, repr=False)

    def target(self, span: slice, log_delta: torch.Tensor, scatter: float) -> ShiftTarget:
        """The target of the block at ``span`` (its log δ and S = Σ δθ²): t is kept where the
        block's smallest and largest log δ stay within the tightest of its bounds."""
        key = (span.start, span.stop)
        if key not in self._limits:  # the bounds are fixed for the policy's lifetime
            self._limits[key] = (float(self.lower[span].max()), float(self.upper[span].min()))
        lower, upper = self._limits[key]
        smallest, largest = torch.aminmax(log_delta)
        lo, hi = lower - float(smallest), upper - float(largest)
        return ShiftTarget(scatter, log_delta.numel(), min(lo, 0.0), max(hi, 0.0), self.least_gain)
