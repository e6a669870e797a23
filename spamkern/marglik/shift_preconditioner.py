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
for the rest. The result is symmetric positive definite, so it can start L-BFGS. Row or
column curvatures an evaluation did not compute (products too large to repeat every time)
are the entries' own curvature less the fraction the coupling cancelled at the last
evaluation that computed them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from spamkern.posterior.blocks import weight_matrix_shape
from spamkern.posterior.laplace import ShiftCurvature
from spamkern.prior.priors import Prior

# curvatures below this fraction of the largest are flat to working precision
FLAT_CURVATURE = 1e-6


class TensorCurvature(NamedTuple):
    """One tensor's curvatures at a point: per entry (own, shaped like its weight matrix),
    along its whole-tensor shift, and along each row's and column's shift."""

    own: torch.Tensor
    tensor: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


class ShiftPreconditioner:
    """Apply the starting inverse Hessian for one point of the iteration."""

    def __init__(self, prior: Prior):
        self.slots = prior.slots
        self.shapes = [weight_matrix_shape(slot.shape) for slot in prior.slots]
        self._cancelled: dict[tuple[int, int], torch.Tensor] = {}  # (tensor, 0 rows/1 cols)

    def complete(self, grad: torch.Tensor, computed: list[ShiftCurvature]) -> list[TensorCurvature]:
        """Every tensor's curvatures at a point with gradient ``grad``, the missing row or
        column ones from the last fraction cancelled (none before any was computed).

        Each is floored at ``FLAT_CURVATURE`` times the largest entry's own curvature (times
        the number of entries the shift moves): the row of a dead unit can cancel to exactly
        0 (measured on LeNet), and dividing by it turned the whole start into NaN."""
        owns = [self._own(grad, slot, shape) for slot, shape in zip(self.slots, self.shapes)]
        unit = FLAT_CURVATURE * torch.stack([own.max() for own in owns]).max()
        out = []
        for t, (own, curv) in enumerate(zip(owns, computed)):
            p, q = own.shape
            sides = [curv.rows, curv.cols]
            for side, axis in ((0, 1), (1, 0)):
                total = own.sum(axis)
                if sides[side] is not None:
                    self._cancelled[t, side] = 1.0 - sides[side] / total
                else:
                    cancelled = self._cancelled.get((t, side))
                    sides[side] = total if cancelled is None else total * (1.0 - cancelled)
            out.append(
                TensorCurvature(
                    own.clamp_min(unit),
                    curv.tensor.clamp_min(unit * p * q),
                    sides[0].clamp_min(unit * q),
                    sides[1].clamp_min(unit * p),
                )
            )
        return out

    def apply(self, curvatures: list[TensorCurvature], q: torch.Tensor) -> torch.Tensor:
        """H0 q at the point whose :meth:`complete` curvatures are given (q over the prior's
        log precisions only: σ is never learned on this path)."""
        out = torch.empty_like(q)
        for slot, shape, curv in zip(self.slots, self.shapes, curvatures):
            span = slice(slot.start, slot.stop)
            _apply_one(q[span].view(shape), curv, out[span].view(shape))
        return out

    @staticmethod
    def _own(grad: torch.Tensor, slot, shape) -> torch.Tensor:
        """½δ_i(θ_i² + Σ_ii) = ½ − ∂E/∂log δ_i, the entries' own curvature."""
        tiny = torch.finfo(grad.dtype).tiny
        return (0.5 - grad[slot.start : slot.stop]).reshape(shape).clamp_min(tiny)


def _apply_one(q: torch.Tensor, curv: TensorCurvature, out: torch.Tensor) -> None:
    """One tensor, written into ``out``: mean, row effects, column effects and rest, each
    over its curvature (in place, one pass per step: these are the size of the prior)."""
    p, n = q.shape
    tiny = torch.finfo(q.dtype).tiny
    row_mean, col_mean = q.mean(1), q.mean(0)
    mean = row_mean.mean()
    row_effect, col_effect = row_mean - mean, col_mean - mean
    rest = torch.sub(q, row_mean[:, None], out=out)  # q − mean − row and column effects
    rest.sub_(col_effect[None, :]).div_(curv.own)
    rest_rows, rest_cols = rest.mean(1), rest.mean(0)  # double-centre rest / own
    rows = n * row_effect / curv.rows.clamp_min(tiny)
    cols = p * col_effect / curv.cols.clamp_min(tiny)
    whole = mean * (p * n) / curv.tensor.clamp_min(tiny)
    rest.add_((rows - rows.mean() - rest_rows + rest_rows.mean() + whole)[:, None])
    rest.add_((cols - cols.mean() - rest_cols)[None, :])
