"""functional_variance against J Π⁻¹ Jᵀ with a dense posterior precision."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import spamkern as sk

from . import models as M
from .dense import dense_precision, expected_log_prior, jacobians, perturb_prior, rel_err
from .fitting import T, fit_perturbed

CASES = {
    "mlp": (M.mlp, "classification"),
    "cnn": (partial(M.cnn, n=5), "classification"),
    "mixed": (M.mixed, "classification"),
    "reg-mlp": (M.regression_mlp, "regression"),
}


def _setup(case, prior, structure, seed):
    post, model, _, _ = fit_perturbed(
        CASES[case], prior, structure, seed, batch_size=4, perturb_offset=20
    )
    factory = CASES[case][0]
    _, X_test, _ = factory(seed=seed + 1)
    _, J = jacobians(model, X_test[:3])
    return post, J


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "unitwise"])
@pytest.mark.parametrize("case", list(CASES))
def test_functional_variance_is_exact(case, prior, structure):
    post, J = _setup(case, prior, structure, seed=3)
    expected = J @ torch.linalg.solve(dense_precision(post), J.transpose(1, 2))
    ours = post.functional_variance(J)
    assert ours.shape == (J.shape[0], J.shape[1], J.shape[1])
    assert rel_err(ours, expected) < 1e-8


def test_functional_variance_parameterwise_uses_the_eigenbasis_diagonal():
    """Per Kronecker block Π̃ = Q diag(s·λ1 ⊗ λ2 + diag(Qᵀ D Q)) Qᵀ; exact diagonal blocks."""
    post, J = _setup("mixed", "parameterwise", "kron", seed=4)
    delta = expected_log_prior(post.prior).exp()
    s = post.curvature_scale
    blocks = []
    for block, factors in zip(post.blocks, post.kron_factors):
        sl = slice(block.offset, block.offset + block.numel)
        if isinstance(factors, torch.Tensor):
            blocks.append(torch.diag(s * factors.reshape(-1) + delta[sl]))
            continue
        lam, Q = torch.linalg.eigh(factors[0])
        if len(factors) == 2:
            lam2, Q2 = torch.linalg.eigh(factors[1])
            lam, Q = torch.outer(lam, lam2).reshape(-1), torch.kron(Q, Q2)
        d = (Q.T @ torch.diag(delta[sl]) @ Q).diagonal()
        blocks.append(Q @ torch.diag(s * lam.clamp_min(0) + d) @ Q.T)
    expected = J @ torch.linalg.solve(torch.block_diag(*blocks), J.transpose(1, 2))
    assert rel_err(post.functional_variance(J), expected) < 1e-8


def test_functional_variance_rejects_wrong_jacobian_shape():
    post, J = _setup("mlp", "layerwise", "kron", seed=5)
    with pytest.raises(ValueError, match=rf"J must be \(batch, outputs, {post.n_params}\)"):
        post.functional_variance(J[..., :-1])


@pytest.mark.parametrize("prior", ["layerwise", "unitwise"])
def test_functional_variance_with_a_two_dimensional_diagonal_block(prior):
    """An Embedding table under structure='kron' is an exact (vocab, dim) diagonal block."""
    model, tokens, y = M.embedding(seed=6)
    post = sk.fit_laplace(
        model, M.dict_loader(tokens, y, 4), structure="kron", prior=prior, temperature=T
    )
    perturb_prior(post, seed=26)
    _, J = jacobians(model, {"tokens": tokens[:3], "labels": y[:3]})
    expected = J @ torch.linalg.solve(dense_precision(post), J.transpose(1, 2))
    assert rel_err(post.functional_variance(J), expected) < 1e-8


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "unitwise"])
@pytest.mark.parametrize("case", ["mlp", "cnn", "mixed"])
def test_covariance_diag_is_the_dense_inverse_diagonal(case, prior, structure):
    post, _ = _setup(case, prior, structure, seed=5)
    expected = torch.linalg.inv(dense_precision(post)).diagonal()
    ours = post.covariance_diag()
    assert ours.shape == (post.n_params,)
    assert rel_err(ours, expected) < 1e-8


def test_covariance_diag_parameterwise_inverts_the_eigenbasis_diagonal():
    """Parameterwise Kronecker blocks: the diagonal of the same Π̃ the log det uses."""
    post, J = _setup("mlp", "parameterwise", "kron", seed=6)
    eye = torch.eye(post.n_params, dtype=J.dtype).unsqueeze(0)
    expected = post.functional_variance(eye)[0].diagonal()
    assert rel_err(post.covariance_diag(), expected) < 1e-10
