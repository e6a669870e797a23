"""The Triton backend inside a real KFAC fit: same factors and evidence as the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, rel_err
from torch import nn

import spamkern as sk


def _cnn_and_data(dtype: torch.dtype):
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 6, (2, 3), stride=2, dilation=(1, 2)),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(4),
    ).to(DEVICE, dtype)
    X = torch.randn(13, 3, 9, 10, dtype=dtype, device=DEVICE)
    model(X[:1])
    return model, X, torch.randint(0, 4, (13,), device=DEVICE)


def _fit(model, X, y, curvature, prior, monkeypatch, backend):
    monkeypatch.setenv("SPAMKERN_BACKEND", backend)
    post = sk.fit_laplace(
        model, (X, y), structure="kron", curvature=curvature, prior=prior,
        prior_precision=0.7, batch_size=8,
    )  # fmt: skip
    lml = post.log_marginal_likelihood()
    grad = torch.autograd.grad(lml, post.prior.log_precision)[0]
    return post, lml, grad


@pytest.mark.parametrize(
    ("curvature", "prior", "dtype"),
    [("ggn", "layerwise", torch.float32), ("ef", "parameterwise", torch.float64)],
)
def test_fit_with_triton_matches_reference(triton_backend, monkeypatch, curvature, prior, dtype):
    model, X, y = _cnn_and_data(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    fast, lml, grad = _fit(model, X, y, curvature, prior, monkeypatch, "triton")
    ref, lml_ref, grad_ref = _fit(model, X, y, curvature, prior, monkeypatch, "torch")
    for blocks, ref_blocks in zip(fast.kron_factors, ref.kron_factors):
        for factor, ref_factor in zip(blocks, ref_blocks):
            assert rel_err(factor, ref_factor) <= tol
    assert rel_err(lml, lml_ref) <= tol
    assert rel_err(grad, grad_ref) <= tol
