"""Parameterwise Kronecker hyperparameter updates: the curvature along shifts of log δ over a
tensor, its rows and its columns equals the evidence's Hessian (float64, autograd), for
Kronecker, bias, row-sliced (grouped convolution) and diagonal blocks; "cheap" skips only
the products that would dominate an evaluation; the coupling matrices between rows' or
columns' shifts equal the Hessian where they are exact; the preconditioner built on them is
symmetric positive definite, Newton on a factored side's shifts and along whole-tensor
shifts elsewhere, reuses its factors only while the diagonal holds and falls back where a
matrix is not positive definite."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from core import layers as L
from core import models as M
from core.fitting import fit_perturbed

import spamkern as sk
from spamkern.marglik.shift_preconditioner import ShiftPreconditioner
from spamkern.posterior.blocks import weight_matrix_shape

CASES = {
    "mlp": ((partial(M.mlp, n=17), "classification"), "kron"),
    "grouped": ((L.grouped, "classification"), "kron"),
    "mlp-diag": ((partial(M.mlp, n=17), "classification"), "diag"),
}


def _posterior_and_point(name: str):
    case, structure = CASES[name]
    post, *_ = fit_perturbed(case, "parameterwise", structure, 0, batch_size=5, perturb_offset=3)
    gen = torch.Generator().manual_seed(1)
    lp = post.prior.log_precision.detach() + torch.randn(
        post.prior.log_precision.shape, dtype=post.mean.dtype, generator=gen
    )
    return post, lp


def _apply(shifts: ShiftPreconditioner, curvatures, q: torch.Tensor) -> torch.Tensor:
    """H0 q over the whole prior, tensor by tensor."""
    spans = [q[slot.start : slot.stop] for slot in shifts.slots]
    parts = [shifts.apply_tensor(t, c, x) for t, (c, x) in enumerate(zip(curvatures, spans))]
    return torch.cat(parts)


def _shift_directions(slot) -> dict[str, list[torch.Tensor]]:
    """0/1 masks over the slot's (p, q) weight matrix: the whole, each row, each column."""
    p, q = weight_matrix_shape(slot.shape)
    eye_p, eye_q = torch.eye(p, dtype=torch.float64), torch.eye(q, dtype=torch.float64)
    return {
        "tensor": [torch.ones(p, q, dtype=torch.float64)],
        "rows": [eye_p[r][:, None].expand(p, q) for r in range(p)],
        "cols": [eye_q[c][None, :].expand(p, q) for c in range(q)],
    }


@pytest.mark.parametrize("name", list(CASES))
def test_shift_curvature_equals_the_evidence_hessian(name):
    post, lp = _posterior_and_point(name)
    hessian = torch.autograd.functional.hessian(lambda x: post.log_evidence(x), lp)
    closed = post.closed_form_evidence_and_gradient(lp, "all")
    assert len(closed.shift_curvature) == len(post.prior.slots)
    for slot, curv in zip(post.prior.slots, closed.shift_curvature):
        block = hessian[slot.start : slot.stop, slot.start : slot.stop]
        for side, masks in _shift_directions(slot).items():
            expected = torch.stack([-(m.reshape(-1) @ block @ m.reshape(-1)) for m in masks])
            got = getattr(curv, side).reshape(-1)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_cheap_couplings_skip_only_a_dominant_side():
    """An MLP with a 300-input first layer: its column couplings (a 300 × 300 product per
    row) would cost more than a sixteenth of the evaluation, its row couplings and every
    other block's do not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(300, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)
    ).double()
    X, y = torch.randn(40, 300, dtype=torch.float64), torch.randint(0, 3, (40,))
    post = sk.fit_laplace(model, (X, y), prior="parameterwise", progress=False)
    lp = post.prior.log_precision.detach()
    cheap = post.closed_form_evidence_and_gradient(lp, "cheap").shift_curvature
    full = post.closed_form_evidence_and_gradient(lp, "all").shift_curvature
    assert cheap[0].cols is None
    for got, want in zip(cheap, full):
        torch.testing.assert_close(got.tensor, want.tensor, rtol=0, atol=0)
        torch.testing.assert_close(got.rows, want.rows, rtol=0, atol=0)
    for got, want in zip(cheap[1:], full[1:]):
        torch.testing.assert_close(got.cols, want.cols, rtol=0, atol=0)
    assert post.closed_form_evidence_and_gradient(lp).shift_curvature is None
    with pytest.raises(ValueError, match="couplings must be one of"):
        post.closed_form_evidence_and_gradient(lp, "some")


def _preconditioner_matrix(name: str):
    post, lp = _posterior_and_point(name)
    closed = post.closed_form_evidence_and_gradient(lp, "all")
    shifts = ShiftPreconditioner(post.prior)
    curvatures = shifts.complete(closed.shift_curvature)
    eye = torch.eye(lp.numel(), dtype=lp.dtype)
    columns = [_apply(shifts, curvatures, e) for e in eye]
    return post, closed, shifts, curvatures, torch.stack(columns, 1)


@pytest.mark.parametrize("name", ["mlp", "grouped"])
def test_preconditioner_is_symmetric_positive_definite(name):
    post, closed, _, curvatures, H0 = _preconditioner_matrix(name)
    torch.testing.assert_close(H0, H0.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(H0).min()) > 0
    assert any(c.side is not None for c in curvatures)  # the coupled sides are used


def _constant_per_tensor(post) -> torch.Tensor:
    """Log precisions equal within each tensor (different between tensors): there the
    rows (columns) of D are all alike and the approximate coupling matrices are exact."""
    lp = post.prior.log_precision.detach().clone()
    for k, slot in enumerate(post.prior.slots):
        lp[slot.start : slot.stop] = 0.3 * k - 0.5
    return lp


def _side_shifts(slot, side: str) -> torch.Tensor:
    """(entries, rows or columns) 0/1 matrix: column j shifts row (column) j of the slot."""
    return torch.stack([m.reshape(-1) for m in _shift_directions(slot)[side]], 1)


@pytest.mark.parametrize("name", ["mlp", "grouped"])
def test_coupling_matrices_equal_the_evidence_hessian_where_exact(name):
    """Between different rows' (columns') shifts, −½ × the coupling matrix is the evidence's
    Hessian: exactly for a bias at any point, for a weight where D is constant along the
    side (here: per tensor). Off the diagonal only — the diagonal comes from ``rows``."""
    post, random_lp = _posterior_and_point(name)
    for lp, weights_exact in ((_constant_per_tensor(post), True), (random_lp, False)):
        hessian = torch.autograd.functional.hessian(lambda x: post.log_evidence(x), lp)
        delta = lp.exp()
        for block, slot in zip(post.curvature_blocks, post.prior.slots):
            p_rows, p_cols = block.shift_sides()
            shape = weight_matrix_shape(slot.shape)
            tensor_delta = delta[slot.start : slot.stop].view(shape)
            span = slice(slot.start, slot.stop)
            for side, size in (("rows", p_rows), ("cols", p_cols)):
                if size < 2 or (p_cols and not weights_exact):
                    continue  # weights are checked where the approximation is exact
                terms = block.parameterwise_terms(tensor_delta, post._scale(), matrix=side)
                U = _side_shifts(slot, side)
                expected = -(U.T @ hessian[span, span] @ U)
                got = -0.5 * terms.coupling_matrix.dense()
                off = ~torch.eye(size, dtype=torch.bool)
                torch.testing.assert_close(got[off], expected[off], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "grouped"])
def test_preconditioner_is_newton_on_its_coupled_side_and_whole_shifts(name):
    """Where the coupling matrices are exact, the start takes the exact Newton step within a
    factored side's shifts (the mean included) and, elsewhere, along whole-tensor shifts."""
    post, _ = _posterior_and_point(name)
    lp = _constant_per_tensor(post)
    hessian = -torch.autograd.functional.hessian(lambda x: post.log_evidence(x), lp)
    closed = post.closed_form_evidence_and_gradient(lp, "all")
    shifts = ShiftPreconditioner(post.prior)
    curvatures = shifts.complete(closed.shift_curvature)
    gen = torch.Generator().manual_seed(3)
    for slot, curv in zip(post.prior.slots, curvatures):
        span = slice(slot.start, slot.stop)
        if curv.side is None:
            U = torch.ones(slot.stop - slot.start, 1, dtype=lp.dtype)
        else:
            U = _side_shifts(slot, curv.side)
        v = torch.randn(U.shape[1], dtype=lp.dtype, generator=gen)
        q = torch.zeros_like(lp)
        q[span] = U @ v
        newton = U @ torch.linalg.solve(U.T @ hessian[span, span] @ U, U.T @ (U @ v))
        torch.testing.assert_close(_apply(shifts, curvatures, q)[span], newton)
    assert sum(c.side is not None for c in curvatures) >= 3


def test_factors_are_reused_while_the_diagonal_holds_and_rebuilt_per_posterior():
    post, lp = _posterior_and_point("mlp")
    closed = post.closed_form_evidence_and_gradient(lp, "all")
    shifts = ShiftPreconditioner(post.prior)
    first = shifts.complete(closed.shift_curvature)
    again = shifts.complete(closed.shift_curvature)
    q = torch.randn(lp.shape, dtype=lp.dtype, generator=torch.Generator().manual_seed(0))
    for a, b in zip(first, again):
        assert (a.factor is None) == (b.factor is None)
        assert a.factor is None or b.factor is a.factor  # reused, scale 1
    torch.testing.assert_close(_apply(shifts, again, q), _apply(shifts, first, q))
    shifts.new_posterior()
    fresh = shifts.complete(closed.shift_curvature)
    assert all(f.factor is None or f.factor is not a.factor for f, a in zip(fresh, first))


def test_a_factor_dearer_than_its_evaluation_is_kept_for_the_whole_posterior():
    """With per-tensor evaluation costs (the per-block iteration), a tensor whose factor
    costs more than evaluating it keeps its first factor, rescaled, however far its diagonal
    moves; a tensor whose factor is cheap rebuilds it once the diagonal has moved."""
    post, lp = _posterior_and_point("mlp")
    closed = post.closed_form_evidence_and_gradient(lp, "all")
    factored = [t for t, c in enumerate(closed.shift_curvature) if c.coupling is not None]
    assert len(factored) >= 2
    cheap, dear = factored[0], factored[1]
    costs = [0] * len(closed.shift_curvature)  # every factor dearer than its evaluation…
    costs[cheap] = 10**12  # …but this one
    shifts = ShiftPreconditioner(post.prior)
    shifts.new_posterior(costs)
    first = shifts.complete(closed.shift_curvature)
    moved = [  # every row and column curvature 4× larger: far past REFACTOR_RATIO
        c._replace(
            rows=None if c.rows is None else 4 * c.rows,
            cols=None if c.cols is None else 4 * c.cols,
        )
        for c in closed.shift_curvature
    ]
    again = shifts.complete(moved)
    assert again[dear].factor is first[dear].factor and again[dear].factor_scale is not None
    assert again[cheap].factor is not None and again[cheap].factor is not first[cheap].factor
    eye = torch.eye(lp.numel(), dtype=lp.dtype)
    H0 = torch.stack([_apply(shifts, again, e) for e in eye], 1)
    assert float(torch.linalg.eigvalsh(0.5 * (H0 + H0.T)).min()) > 0
    with pytest.raises(ValueError, match="one entry per tensor"):
        shifts.new_posterior(costs[:-1])


def test_an_indefinite_coupling_falls_back_to_the_per_row_curvatures():
    post, lp = _posterior_and_point("mlp")
    closed = post.closed_form_evidence_and_gradient(lp, "all")
    broken = []
    for c in closed.shift_curvature:
        if c.coupling is not None:  # ten times the coupling: no longer positive definite
            c.coupling.weights = 10.0 * c.coupling.weights
        broken.append(c)
    shifts = ShiftPreconditioner(post.prior)
    curvatures = shifts.complete(broken)
    assert all(c.side is None and c.factor is None for c in curvatures)
    eye = torch.eye(lp.numel(), dtype=lp.dtype)
    H0 = torch.stack([_apply(shifts, curvatures, e) for e in eye], 1)
    assert float(torch.linalg.eigvalsh(0.5 * (H0 + H0.T)).min()) > 0


def test_zero_shift_curvatures_are_floored_not_divided_by():
    """A dead unit's row can cancel to exactly zero curvature: the start stays finite and
    positive definite, every curvature at least 10⁻⁶ of the largest entry's."""
    post, lp = _posterior_and_point("mlp")
    closed = post.closed_form_evidence_and_gradient(lp, "all")
    zeroed = [
        c._replace(rows=torch.zeros_like(c.rows), tensor=c.tensor * 0)
        for c in closed.shift_curvature
    ]
    shifts = ShiftPreconditioner(post.prior)
    curvatures = shifts.complete(zeroed)
    unit = 1e-6 * max(float(c.own.max()) for c in curvatures)
    for c in curvatures:
        assert float(c.rows.min()) >= unit * c.own.shape[1] * (1 - 1e-12)
        assert float(c.tensor) >= unit * c.own.numel() * (1 - 1e-12)
    eye = torch.eye(lp.numel(), dtype=lp.dtype)
    H0 = torch.stack([_apply(shifts, curvatures, e) for e in eye], 1)
    assert bool(torch.isfinite(H0).all())
    assert float(torch.linalg.eigvalsh(0.5 * (H0 + H0.T)).min()) > 0


def test_missing_sides_reuse_the_cancelled_fraction():
    post, closed, shifts, curvatures, _ = _preconditioner_matrix("mlp")
    partial_curv = [c._replace(rows=None, cols=None) for c in closed.shift_curvature]
    again = shifts.complete(partial_curv)
    for got, want in zip(again, curvatures):
        torch.testing.assert_close(got.rows, want.rows, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.cols, want.cols, rtol=1e-12, atol=0)
    fresh = ShiftPreconditioner(post.prior).complete(partial_curv)
    for got, slot in zip(fresh, post.prior.slots):  # nothing cancelled known: own curvature
        own = (0.5 - closed.grad[slot.start : slot.stop]).reshape(weight_matrix_shape(slot.shape))
        torch.testing.assert_close(got.rows, own.sum(1))


@pytest.mark.parametrize(
    "factory",
    [M.mixed, L.grouped, L.self_attention],
    ids=["norm-layers-diag-blocks", "grouped-conv", "attention"],
)
def test_fixed_point_passes_adam_with_every_block_type(factory):
    """The preconditioned iteration on Kronecker posteriors that mix exact diagonal blocks
    (norm layers), row-sliced blocks (grouped convolutions, packed q/k/v) and plain ones:
    at least the evidence of 100 Adam steps from the same start, in fewer evaluations."""
    from spamkern.marglik.hyper import make_hyper_optimizer

    post, *_ = fit_perturbed(
        (factory, "classification"), "parameterwise", "kron", 0, batch_size=4, perturb_offset=5
    )
    start = post.prior.log_precision.detach().clone()
    results = {}
    for method in ("adam", "fixed-point"):
        opt = make_hyper_optimizer(method, post.prior)
        results[method] = (opt.step(post), opt.n_evaluations)
        with torch.no_grad():
            post.prior.log_precision.copy_(start)
    assert results["fixed-point"][0] >= results["adam"][0]
    assert results["fixed-point"][1] < results["adam"][1]


def test_coupling_matrix_requests_are_checked():
    post, lp = _posterior_and_point("mlp")
    weight, bias = post.curvature_blocks[0], post.curvature_blocks[1]
    delta = lp.exp()
    slots = post.prior.slots
    d_weight = delta[slots[0].start : slots[0].stop].view(weight_matrix_shape(slots[0].shape))
    d_bias = delta[slots[1].start : slots[1].stop].view(weight_matrix_shape(slots[1].shape))
    with pytest.raises(ValueError, match="'rows', 'cols' or None"):
        weight.parameterwise_terms(d_weight, post._scale(), matrix="both")
    with pytest.raises(ValueError, match="single column"):
        bias.parameterwise_terms(d_bias, post._scale(), matrix="cols")
    diag_post, diag_lp = _posterior_and_point("mlp-diag")
    block, slot = diag_post.curvature_blocks[0], diag_post.prior.slots[0]
    d = diag_lp.exp()[slot.start : slot.stop].view(weight_matrix_shape(slot.shape))
    assert block.shift_sides() == (0, 0)
    with pytest.raises(ValueError, match="uncoupled"):
        block.parameterwise_terms(d, diag_post._scale(), matrix="rows")
