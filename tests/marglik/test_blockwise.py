"""The parameterwise Kronecker update runs one iteration per block: the evidence is the log
likelihood plus one share per block (float64, against the full evidence and its autograd
gradient), a share reads only its own block's precisions, a block whose precisions are
already optimal is not iterated while another is, no block's share ever decreases, and the
round-off stopping rule does not mistake a long step's model error for round-off; a block
moved off its optimum by a constant is back after one evaluation (the fitted shift), and
the iteration without that fit reaches the same optimum; a first direction applies the
preconditioner once and a non-finite one is an error; bad requests are refused;
regression at fixed σ takes the same path."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
import torch
from core import layers as L
from core import models as M
from core.fitting import fit_perturbed

import spamkern.marglik.blockwise as blockwise
from spamkern.marglik.hyper import make_hyper_optimizer
from spamkern.marglik.quasi_newton import SecantMemory
from spamkern.marglik.shift_preconditioner import ShiftPreconditioner
from spamkern.posterior.blocks import KronBlock, weight_matrix_shape

CASES = {
    "mlp": (partial(M.mlp, n=17), "classification"),
    "grouped": (L.grouped, "classification"),
    "reg-mlp": (partial(M.regression_mlp, n=23), "regression"),
}


def _posterior(name: str, prior: str = "parameterwise"):
    post, *_ = fit_perturbed(CASES[name], prior, "kron", 0, batch_size=5, perturb_offset=3)
    return post


@pytest.mark.parametrize("name", list(CASES))
def test_block_shares_sum_to_the_evidence_and_its_gradient(name):
    post = _posterior(name)
    lp = post.prior.log_precision.detach().clone().requires_grad_(True)
    full = post.log_evidence(lp)
    (grad,) = torch.autograd.grad(full, lp)
    shares = post.parameterwise_shares(lp.detach(), range(len(post.prior.slots)))
    total = post.evidence_from_shares([share.value for share in shares])
    assert float(total) == pytest.approx(float(full.detach()), rel=1e-12)
    torch.testing.assert_close(torch.cat([share.grad for share in shares]), grad)


def test_a_share_reads_only_its_own_block():
    post = _posterior("mlp")
    lp = post.prior.log_precision.detach().clone()
    moved = lp.clone()
    for slot in post.prior.slots[1:]:
        moved[slot.start : slot.stop] += 2.0
    (before,) = post.parameterwise_shares(lp, [0], "all")
    (after,) = post.parameterwise_shares(moved, [0], "all")
    assert float(after.value) == float(before.value)
    torch.testing.assert_close(after.grad, before.grad, rtol=0, atol=0)
    (other,) = post.parameterwise_shares(moved, [1])
    assert float(other.value) != float(post.parameterwise_shares(lp, [1])[0].value)


def _evaluations_per_block(monkeypatch, post) -> Counter:
    """Count each block's projected evaluations (shares call the block's terms)."""
    calls: Counter = Counter()
    index = {id(block): i for i, block in enumerate(post.curvature_blocks)}
    original = KronBlock.parameterwise_terms

    def counted(self, *args, **kwargs):
        calls[index[id(self)]] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KronBlock, "parameterwise_terms", counted)
    return calls


def test_only_the_block_away_from_its_optimum_is_iterated(monkeypatch):
    post = _posterior("mlp")
    make_hyper_optimizer("fixed-point", post.prior).step(post)  # every block at its optimum
    moved = 2  # the second weight matrix, half of its rows moved (not a constant shift)
    slot = post.prior.slots[moved]
    rows = weight_matrix_shape(slot.shape)[0]
    with torch.no_grad():
        block = post.prior.log_precision[slot.start : slot.stop].view(rows, -1)
        block[: rows // 2] += 1.5
    calls = _evaluations_per_block(monkeypatch, post)
    opt = make_hyper_optimizer("fixed-point", post.prior)
    opt.step(post)
    assert calls[moved] >= 4
    others = [calls[i] for i in range(len(post.prior.slots)) if i != moved]
    assert max(others) <= 2  # the first evaluation, at most one trial step
    assert opt.n_evaluations == calls[moved]  # the moved block ran longest
    assert opt.block_evaluations == [calls[i] for i in range(len(post.prior.slots))]


def test_no_block_share_ever_decreases(monkeypatch):
    post = _posterior("grouped")
    shares: dict[int, list[float]] = {}
    original = blockwise.BlockwiseShiftUpdate._settle

    def recorded(self, block, share):
        accepted = original(self, block, share)
        shares.setdefault(block.index, []).append(block.point.value)
        return accepted

    monkeypatch.setattr(blockwise.BlockwiseShiftUpdate, "_settle", recorded)
    opt = make_hyper_optimizer("fixed-point", post.prior, tol=0.0, n_steps=30)
    start = float(post.log_evidence().detach())
    value = opt.step(post)
    assert value > start
    assert len(shares) == len(post.prior.slots)
    for values in shares.values():  # float64: the guard compares the values themselves
        assert all(b >= a for a, b in zip(values, values[1:]))


def test_a_block_moved_by_a_constant_is_back_after_its_first_evaluation(monkeypatch):
    """The fitted shift undoes a uniform offset of one block's log δ in the evaluation that
    sees it: no step is taken for it, and the evidence is the optimum's again."""
    post = _posterior("mlp")
    opt = make_hyper_optimizer("fixed-point", post.prior)
    optimum = opt.step(post)
    moved = 2
    slot = post.prior.slots[moved]
    with torch.no_grad():
        post.prior.log_precision[slot.start : slot.stop] += 1.5
    assert float(post.log_evidence().detach()) < optimum - 1.0
    calls = _evaluations_per_block(monkeypatch, post)
    again = make_hyper_optimizer("fixed-point", post.prior)
    value = again.step(post)
    assert calls[moved] <= 2  # the first evaluation, at most one trial step
    assert value == pytest.approx(optimum, abs=again.tol * post.n_data * 10)


@pytest.mark.parametrize("name", ["mlp", "grouped"])
def test_the_update_without_the_shift_fit_reaches_the_same_optimum(name):
    """``fit_shift=False`` (plain preconditioned L-BFGS per block) and the default end at
    the same evidence from the same start; the fit takes no more block evaluations than
    one in ten over (on these few-entry models a block's count moves by one between
    machines — another BLAS rounds the decompositions differently near the stopping test)."""
    post = _posterior(name)
    opt = make_hyper_optimizer("fixed-point", post.prior)
    x0 = post.prior.log_precision.detach().clone()
    bounds = (torch.full_like(x0, -30.0), torch.full_like(x0, 30.0))
    results = {}
    for fit_shift in (False, True):
        shifts = ShiftPreconditioner(post.prior)
        shifts.new_posterior([b.side_costs()[0] for b in post.curvature_blocks])
        update = blockwise.BlockwiseShiftUpdate(
            shifts, opt.n_steps, opt.tol * post.n_data, opt.max_log_step, opt.memory, fit_shift
        )
        _, value = update.run(post, x0, bounds)
        results[fit_shift] = (value, sum(update.block_evaluations))
    assert results[True][0] == pytest.approx(results[False][0], abs=opt.tol * post.n_data * 10)
    assert results[True][1] <= 1.1 * results[False][1]


def test_a_first_direction_applies_the_preconditioner_once(monkeypatch):
    """With no secant pairs yet, a block's direction is the preconditioned gradient: one
    application per block at the first point, none repeated as a restart."""
    post = _posterior("mlp")
    applied = Counter()
    original = ShiftPreconditioner.apply_tensor

    def counted(self, t, curvature, q):
        applied[t] += 1
        return original(self, t, curvature, q)

    monkeypatch.setattr(ShiftPreconditioner, "apply_tensor", counted)
    opt = make_hyper_optimizer("fixed-point", post.prior, n_steps=1)
    opt.step(post)
    assert applied == Counter(range(len(post.prior.slots)))


def test_a_non_finite_direction_is_an_error_not_a_stop(monkeypatch):
    """A NaN direction fails its ascent test as quietly as a converged one would; the
    update must say so instead of ending there."""
    post = _posterior("mlp")

    def broken(self, t, curvature, q):
        return torch.full_like(q, float("nan"))

    monkeypatch.setattr(ShiftPreconditioner, "apply_tensor", broken)
    with pytest.raises(RuntimeError, match="non-finite direction"):
        make_hyper_optimizer("fixed-point", post.prior).step(post)


def test_a_long_steps_model_error_is_not_round_off():
    memory = SecantMemory(5)
    memory.gains, memory.noise = [16.0, 32.0, 9.0], [20.0, 30.0, 20.0]
    assert not memory.within_roundoff(0.01)  # gains far above the round-off
    assert memory.stalled(1e-3)  # the joint iteration's unbounded rule stops
    memory.gains, memory.noise = [0.004, 0.003, 0.005], [0.01, 0.01, 0.01]
    assert memory.within_roundoff(0.01)


def test_bad_share_requests_are_refused():
    post = _posterior("mlp")
    lp = post.prior.log_precision.detach()
    n = len(post.prior.slots)
    for indices in ([n], [-1], [0, 0], [1.0], [True]):
        with pytest.raises(ValueError, match="block indices"):
            post.parameterwise_shares(lp, indices)
    with pytest.raises(ValueError, match="prior's shape"):
        post.parameterwise_shares(lp[:-1], [0])
    with pytest.raises(ValueError, match="couplings"):
        post.parameterwise_shares(lp, [0], "some")
    scalar = _posterior("mlp", "layerwise")
    with pytest.raises(ValueError, match="parameterwise prior"):
        scalar.parameterwise_shares(scalar.prior.log_precision.detach(), [0])


def test_regression_at_fixed_sigma_is_iterated_per_block(monkeypatch):
    """σ not learned: the per-block path, its value the evidence at the written-back δ
    (the shares carry no σ term; the log likelihood does) and above 100 Adam steps."""
    post = _posterior("reg-mlp")
    start = post.prior.log_precision.detach().clone()
    adam = make_hyper_optimizer("adam", post.prior, lr=0.1, n_steps=100).step(post)
    with torch.no_grad():
        post.prior.log_precision.copy_(start)
    calls = _evaluations_per_block(monkeypatch, post)
    opt = make_hyper_optimizer("fixed-point", post.prior)
    value = opt.step(post)
    assert sum(calls.values()) == sum(opt.block_evaluations) > len(post.prior.slots)
    assert value >= adam
    lp = post.prior.log_precision.detach()
    assert float(post.log_evidence(lp).detach()) == pytest.approx(value, rel=1e-12)
