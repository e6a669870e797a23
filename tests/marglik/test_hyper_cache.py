"""The unitwise evidence reuses each whitened factor's eigendecomposition while its whitening
is unchanged: moving only the rows a re-decomposes G̃ alone, only the columns b Ã alone (1-D
tensors take a Cholesky factorisation instead). The evidence, its gradient (exact, first
order, without autograd through eigh) and γ must equal a fresh computation and a dense
float64 reference at every point of such a sequence."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from core import models as M
from core.dense import block_matrix
from core.fitting import fit_perturbed

from spamkern.marglik.hyper import effective_parameters, make_hyper_optimizer
from spamkern.posterior.blocks import WhitenedEigenCache

CASES = {
    "mlp": (partial(M.mlp, n=17), "classification"),
    "cnn": (partial(M.cnn, n=7), "classification"),
    "reg-mlp": (partial(M.regression_mlp, n=13), "regression"),
}


def _parts(post):
    return [part for block in post.curvature_blocks for part in block.kron_parts()]


def _decompositions(post) -> int:
    return sum(sum(part.unit_cache.n_decompositions) for part in _parts(post))


def _columns(post) -> torch.Tensor:
    """1 at every unitwise column precision b, 0 elsewhere (rows a, 1-D tensors)."""
    mask = torch.zeros_like(post.prior.log_precision.detach())
    for slot in post.prior.slots:
        if len(slot.shape) >= 2:
            mask[slot.start + slot.rows : slot.stop] = 1.0
    return mask


def _evidence_and_grad(post, lp, ls):
    args = [lp.clone().requires_grad_(True)] + (
        [ls.clone().requires_grad_(True)] if ls is not None else []
    )
    value = post.log_evidence(*args)
    return value.detach(), torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, args)])


def _dense_evidence_and_grad(post, lp, ls):
    """The same evidence from the dense precision s·K + diag(δ) and torch.logdet."""
    args = [lp.clone().requires_grad_(True)] + (
        [ls.clone().requires_grad_(True)] if ls is not None else []
    )
    log_delta = post.prior.log_precision_diag(args[0])
    scale = post._scale(args[1] if ls is not None else None)
    precision = scale * block_matrix(post.kron_factors) + torch.diag(log_delta.exp())
    log_det_ratio = torch.logdet(precision) - log_delta.sum()
    scatter = (log_delta.exp() * post.mean.square()).sum()
    value = post.log_likelihood(args[1] if ls is not None else None) - 0.5 * (
        log_det_ratio + scatter
    )
    return value.detach(), torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, args)])


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("case", ["mlp", "cnn", "reg-mlp"])
def test_cached_row_and_column_moves_match_fresh_and_dense(case):
    post, *_ = fit_perturbed(CASES[case], "unitwise", "kron", 5, batch_size=8, perturb_offset=40)
    assert post.mean.dtype == torch.float64
    ls = post.log_sigma.clone() if post.likelihood == "regression" else None
    columns = _columns(post)
    gen = torch.Generator().manual_seed(1)
    lp = post.prior.log_precision.detach().clone()
    post.log_evidence(lp)  # fills the caches at the start point
    for moved in (1.0 - columns, columns, 1.0 - columns, columns):
        lp = lp + 0.5 * moved * torch.randn(lp.shape, generator=gen, dtype=lp.dtype)
        before = _decompositions(post)
        cached = _evidence_and_grad(post, lp, ls)
        gamma_cached = effective_parameters(post, lp)
        # one side moved: only that side's factors were decomposed again (G̃ or Ã of every
        # weight; a 1-D tensor's log det is a Cholesky factorisation, never decomposed)
        n_weights = sum(len(p.factors) == 2 for p in _parts(post))
        assert _decompositions(post) - before == n_weights
        for part in _parts(post):
            part.unit_cache = WhitenedEigenCache()  # a fresh computation
        fresh = _evidence_and_grad(post, lp, ls)
        gamma_fresh = effective_parameters(post, lp)
        dense = _dense_evidence_and_grad(post, lp, ls)
        assert _close(cached[0], fresh[0]) <= 1e-10 and _close(cached[1], fresh[1]) <= 1e-10
        assert _close(gamma_cached, gamma_fresh) <= 1e-10
        assert _close(cached[0], dense[0]) <= 1e-10 and _close(cached[1], dense[1]) <= 1e-10
        post.log_evidence(lp)  # back to caches holding the current point


def test_covariance_diag_from_the_cache_matches_the_dense_inverse():
    post, *_ = fit_perturbed(CASES["cnn"], "unitwise", "kron", 2, batch_size=8, perturb_offset=9)
    lp = post.prior.log_precision.detach().clone()
    post.log_evidence(lp)
    before = _decompositions(post)
    diag = post.covariance_diag(lp)
    # every weight's factors came from the cache; 1-D tensors (Cholesky in the evidence)
    # are decomposed here, once each
    n_vectors = sum(len(p.factors) == 1 for p in _parts(post))
    assert n_vectors > 0 and _decompositions(post) - before == n_vectors
    log_delta = post.prior.log_precision_diag(lp)
    precision = post.curvature_scale * block_matrix(post.kron_factors) + torch.diag(log_delta.exp())
    assert _close(diag, torch.linalg.inv(precision).diagonal()) <= 1e-10


def test_fixed_point_cheap_steps_reuse_the_largest_input_factor():
    """After each full step the fixed-point iteration takes cheap steps that hold the
    columns of the blocks with the largest input factor: that Ã is decomposed on the full
    steps alone, the other factors on every step, and the iteration still ends stationary."""
    post, *_ = fit_perturbed(CASES["mlp"], "unitwise", "kron", 4, batch_size=8, perturb_offset=3)
    opt = make_hyper_optimizer("fixed-point", post.prior, tol=0.0, n_steps=60)
    opt.step(post)
    weights = [part for part in _parts(post) if len(part.factors) == 2]
    widest = max(part.factors[1].shape[0] for part in weights)
    row_counts = [part.unit_cache.n_decompositions[0] for part in weights]
    column_counts = [part.unit_cache.n_decompositions[1] for part in weights]
    for part, rows, cols in zip(weights, row_counts, column_counts):
        if part.factors[1].shape[0] == widest:  # held on cheap steps
            assert cols <= 0.5 * rows
        else:
            assert cols == rows
    lp = post.prior.log_precision.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(post.log_evidence(lp), lp)
    gamma = effective_parameters(post, lp.detach())
    assert float((2 * grad).abs().max()) <= 1e-6 * max(1.0, float(gamma.abs().max()))


def test_a_kept_input_factor_reuses_its_whitened_decomposition_across_posteriors():
    """The data-only A of a first layer outlives one fit: the next posterior's first
    evaluation at the same precisions takes its whitened decomposition from the previous
    one — the same evidence and gradient as a fresh decomposition, to round-off."""
    import spamkern as sk
    from spamkern.curvature.harvest import InputFactors
    from spamkern.curvature.structure import parameter_blocks

    model, X, y = CASES["mlp"][0](seed=3)
    cache = InputFactors(parameter_blocks(model, "kron"))
    assert cache.detect(model, X[:4]) == [0]
    first = sk.fit_laplace(model, (X, y), prior="unitwise", progress=False)
    cache.update(first.curvature)
    lp = first.prior.log_precision.detach() + 0.2
    again = sk.fit_laplace(
        model, (X, y), prior="unitwise", progress=False, input_factors=cache.given()
    )
    fresh = sk.fit_laplace(model, (X, y), prior="unitwise", progress=False)
    with torch.no_grad():
        for p in (first, again, fresh):
            p.prior.log_precision.copy_(lp)
    first.log_evidence(lp)  # decomposes the kept A at these precisions
    reused = _evidence_and_grad(again, lp, None)
    assert _parts(again)[0].unit_cache.n_decompositions == [1, 0]  # Ã came from the memo
    expected = _evidence_and_grad(fresh, lp, None)
    assert _close(reused[0], expected[0]) <= 1e-12 and _close(reused[1], expected[1]) <= 1e-12


def test_a_failed_bias_cholesky_falls_back_to_the_eigendecomposition(monkeypatch):
    """A 1-D tensor's log det by Cholesky, and — where the factorisation fails (a precision
    singular to working precision) — by the whitened eigendecomposition: the same value and
    gradient (w.r.t. the precisions and the curvature scale) in float64."""
    from spamkern.posterior.blocks import unitwise_logdet
    from spamkern.prior import make_prior

    gen = torch.Generator().manual_seed(0)
    root = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    G = root.T @ root
    prior = make_prior("unitwise", [("bias", torch.zeros(6, dtype=torch.float64))])
    log_d = torch.randn(6, generator=gen, dtype=torch.float64)

    def logdet():
        x = log_d.clone().requires_grad_(True)
        scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        (tp,) = prior.per_tensor(x)
        value = unitwise_logdet([([G], tp, torch.Size((6,)))], scale)
        return value.detach(), torch.autograd.grad(value, (x, scale))

    value, grads = logdet()
    dense = torch.logdet(0.7 * G + torch.diag(log_d.exp()))
    torch.testing.assert_close(value, dense, rtol=1e-12, atol=0)
    failing = torch.linalg.cholesky_ex

    def fail(matrix):
        factor, info = failing(matrix)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fail)
    value_eig, grads_eig = logdet()
    torch.testing.assert_close(value_eig, value, rtol=1e-12, atol=0)
    for got, want in zip(grads_eig, grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
