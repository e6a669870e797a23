"""The starting inverse Hessian of the fixed-point update for parameterwise Kronecker posteriors.

A parameterwise prior on a Kronecker block enters the evidence through the projected
δ̃ = (Q1∘Q1)ᵀ D (Q2∘Q2): every entry's δ is averaged with many others. Each entry's own
curvature −∂²E/∂(log δ_i)² is about ½δ_i(θ_i² + Σ_ii), but along a shift of log δ over a
whole tensor, a row or a column the coupling cancels much of it (entirely, where the
prior dominates δ̃), so a per-entry scaling oversteps those directions many times over —
and the per-entry MacKay step, built on one θ_i² each, is worse still. Measured on an MLP
784-256-256-10: with a per-entry or identity start the quasi-Newton iteration spent most
of its evaluations on row means (first and second layer) and column means (last layer).

So the gradient of each tensor's (p, q) weight matrix is split as a two-way analysis of
variance — its mean, its row effects, its column effects and the rest, orthogonal parts —
and each part gets its own curvature: the exact curvature of a whole-tensor shift for the
mean, of each row's (column's) shift for the row (column) effects, and the per-entry one
for the rest. Row or column curvatures an evaluation did not compute (products too large to
repeat every time) are the entries' own curvature less the fraction the coupling cancelled
at the last evaluation that computed them.

Shifts of different rows (columns) are coupled too: on an MLP the second layer's 256 row
shifts had 13 directions whose curvature the per-row values overstated up to 30 times, and
with a memory of five pairs L-BFGS learnt them only over many steps. Where the evaluation
returns a side's coupling matrix, that side's shifts — the mean included — are solved
together with it (a Cholesky factor per point, the per-row curvatures on its diagonal);
the other side's effects and the rest are treated as above. If the approximate matrix is
not positive definite at a point, that block falls back to the per-row values. Every part
stays symmetric positive definite, so the result can start L-BFGS.

A factor is rebuilt once the diagonal has moved (``REFACTOR_RATIO``) — but in the per-block
iteration, a block whose factor costs more than evaluating the block itself (an m-row side
costs ~m³ multiply-adds: a 256-unit bias's factor is ~100 of its evaluations, a 10 × 256
output layer's column factor 16) keeps the first factor of the marglik step, rescaled to
each point's diagonal. Measured on an MLP 784-256-256-10 in 4-epoch SpaM training: 32
factorisations per run instead of 55, for 111 block evaluations instead of 109.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from spamkern.ops.cholesky import cholesky_lower
from spamkern.posterior.blocks import weight_matrix_shape
from spamkern.posterior.laplace import ShiftCurvature
from spamkern.posterior.projected import CouplingMatrix
from spamkern.prior.priors import Prior

# curvatures below this fraction of the largest are flat to working precision
FLAT_CURVATURE = 1e-6
# a side's factor is rebuilt once a diagonal entry moved by more than this factor since:
# measured on an MLP 784-256-256-10 in 4-epoch SpaM training, rebuilding at every point
# and at a ratio of e^0.1 took 26 evaluations, e^0.3 27 and e^0.7 32
REFACTOR_RATIO = 1.35


class TensorCurvature(NamedTuple):
    """One tensor's curvatures at a point: per entry (own, shaped like its weight matrix),
    along its whole-tensor shift, along each row's and column's shift, and the Cholesky
    factor (float64) of one side's shift Hessian where its coupling matrix is known."""

    own: torch.Tensor
    tensor: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    side: str | None = None  # "rows" or "cols": the side solved with ``factor``
    factor: torch.Tensor | None = None
    factor_scale: torch.Tensor | None = None  # √(built diagonal / this point's), if reused


class ShiftPreconditioner:
    """Apply the starting inverse Hessian for one point of the iteration."""

    def __init__(self, prior: Prior):
        self.slots = prior.slots
        self.shapes = [weight_matrix_shape(slot.shape) for slot in prior.slots]
        self._cancelled: dict[tuple[int, int], torch.Tensor] = {}  # (tensor, 0 rows/1 cols)
        # per tensor: the last factor built (side, Cholesky factor, the diagonal it holds)
        self._factors: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
        self._own_max: dict[int, float] = {}  # per tensor, at its latest point
        self._evaluation_costs: list[int] | None = None

    def new_posterior(self, evaluation_costs: list[int] | None = None) -> None:
        """Forget the factors: they belong to the last posterior's eigenbases.

        ``evaluation_costs`` (multiply-adds per tensor, when each is evaluated alone: the
        per-block iteration) marks the tensors whose factor costs more than an evaluation;
        those keep their first factor until the next posterior (see the module docstring)."""
        if evaluation_costs is not None and len(evaluation_costs) != len(self.shapes):
            raise ValueError(
                f"evaluation_costs needs one entry per tensor of the prior ({len(self.shapes)}),"
                f" got {len(evaluation_costs)}"
            )
        self._factors.clear()
        self._own_max.clear()
        self._evaluation_costs = evaluation_costs

    def complete(self, computed: list[ShiftCurvature]) -> list[TensorCurvature]:
        """Every tensor's curvatures at one point (see :meth:`complete_tensor`), each floored
        against the largest own curvature of all of them."""
        for t, curv in enumerate(computed):
            self._own_max[t] = float(curv.own.max())
        return [self._complete(t, curv) for t, curv in enumerate(computed)]

    def complete_tensor(self, t: int, computed: ShiftCurvature) -> TensorCurvature:
        """Tensor ``t``'s curvatures at a point from those its evaluation ``computed`` (its
        entries' own curvature included), the missing row or column ones from the last
        fraction cancelled (none before any was computed).

        Each is floored at ``FLAT_CURVATURE`` times the largest entry's own curvature of
        any tensor at its latest point (times the number of entries the shift moves): the
        row of a dead unit can cancel to exactly 0 (measured on LeNet), and dividing by it
        turned the whole start into NaN."""
        self._own_max[t] = float(computed.own.max())
        return self._complete(t, computed)

    def _complete(self, t: int, curv: ShiftCurvature) -> TensorCurvature:
        tiny = torch.finfo(curv.own.dtype).tiny
        unit = max(FLAT_CURVATURE * max(self._own_max.values()), tiny)
        p, q = curv.own.shape
        sides = [curv.rows, curv.cols]
        for side in (0, 1):
            total = curv.own_sums[side]
            if sides[side] is not None:
                self._cancelled[t, side] = 1.0 - sides[side] / total.clamp_min(tiny)
            else:
                cancelled = self._cancelled.get((t, side))
                sides[side] = total if cancelled is None else total * (1.0 - cancelled)
        rows, cols = sides[0].clamp_min(unit * q), sides[1].clamp_min(unit * p)
        return TensorCurvature(
            curv.own.clamp_min(unit),
            curv.tensor.clamp_min(unit * p * q),
            rows,
            cols,
            *self._factor(t, curv.coupling, rows, cols),
        )

    def _factor(
        self, t: int, coupling: CouplingMatrix | None, rows: torch.Tensor, cols: torch.Tensor
    ) -> tuple:
        """(side, Cholesky factor, scale) of tensor ``t``'s shift Hessian on the coupled
        side, or Nones. The last factor is reused — rescaled to this point's diagonal —
        while every diagonal entry stays within ``REFACTOR_RATIO`` of the one it was built
        with; otherwise the matrix is built and factorised afresh."""
        if coupling is None:
            return None, None, None
        diagonal = rows if coupling.side == "rows" else cols
        cached = self._factors.get(t)
        if cached is not None and cached[0] == coupling.side:
            ratio = cached[2] / diagonal
            limit = self._refactor_ratio(t, diagonal.numel())
            if float(ratio.max()) <= limit and float(ratio.min()) >= 1 / limit:
                return coupling.side, cached[1], ratio.sqrt()
        hessian = (-0.5 * coupling.dense()).to(torch.float64)
        hessian.diagonal().copy_(diagonal)
        factor, info = cholesky_lower(hessian)
        if int(info) != 0:  # the approximation is not positive definite here
            self._factors.pop(t, None)
            return None, None, None
        self._factors[t] = (coupling.side, factor, diagonal)
        return coupling.side, factor, None

    def _refactor_ratio(self, t: int, size: int) -> float:
        """How far tensor ``t``'s diagonal may move before its factor (``size`` rows) is
        rebuilt: never within a posterior where the factor costs more than an evaluation."""
        costs = self._evaluation_costs
        return math.inf if costs is not None and size**3 > costs[t] else REFACTOR_RATIO

    def apply_tensor(self, t: int, curvature: TensorCurvature, q: torch.Tensor) -> torch.Tensor:
        """H0 q for tensor ``t`` alone (``q`` over its slot, flat)."""
        out = torch.empty_like(q)
        _apply_one(q.view(self.shapes[t]), curvature, out.view(self.shapes[t]))
        return out


def _solve(curv: TensorCurvature, rhs: torch.Tensor) -> torch.Tensor:
    """H⁻¹ rhs on the factored side, H = s⁻¹ F Fᵀ s⁻¹ with s the reuse scale (or 1)."""
    scale = curv.factor_scale
    rhs = rhs if scale is None else rhs * scale
    # two triangular solves: a sixth of cholesky_solve's time for one right-hand side
    half = torch.linalg.solve_triangular(
        curv.factor, rhs.to(curv.factor.dtype)[:, None], upper=False
    )
    out = torch.linalg.solve_triangular(curv.factor.mT, half, upper=True)[:, 0].to(rhs.dtype)
    return out if scale is None else out * scale


def _apply_one(q: torch.Tensor, curv: TensorCurvature, out: torch.Tensor) -> None:
    """One tensor, written into ``out``: mean, row effects, column effects and rest, each
    over its curvature (in place, one pass per step: these are the size of the prior); a
    side with a factor is solved with the mean as one system."""
    p, n = q.shape
    if n == 1 and curv.side == "rows":  # a bias solved whole: no column effects, no rest
        out[:, 0] = _solve(curv, q[:, 0])
        return
    tiny = torch.finfo(q.dtype).tiny
    row_mean, col_mean = q.mean(1), q.mean(0)
    mean = row_mean.mean()
    rest = torch.sub(q, row_mean[:, None], out=out)  # q − mean − row and column effects
    rest.sub_((col_mean - mean)[None, :]).div_(curv.own)
    rest_rows, rest_cols = rest.mean(1), rest.mean(0)  # double-centre rest / own
    if curv.side == "rows":  # row sums: the mean and the row effects solved together
        rows = _solve(curv, n * row_mean)
    else:
        rows = n * (row_mean - mean) / curv.rows.clamp_min(tiny)
        rows = rows - rows.mean()
    if curv.side == "cols":
        cols = _solve(curv, p * col_mean)
    else:
        cols = p * (col_mean - mean) / curv.cols.clamp_min(tiny)
        cols = cols - cols.mean()
    if curv.side is None:
        rows = rows + mean * (p * n) / curv.tensor.clamp_min(tiny)
    rest.add_((rows - rest_rows + rest_rows.mean())[:, None])
    rest.add_((cols - rest_cols)[None, :])
