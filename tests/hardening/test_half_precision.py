"""Half precision: the predictives give the float32 answer; posterior fitting refuses clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spamkern as sk
from spamkern.metrics import glm_predictive, map_predictive

HALF = [torch.float16, torch.bfloat16]
# one rounding of outputs in [0, 1]: 2^-11 (float16), 2^-8 (bfloat16), plus the inputs'
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _half_exact_model() -> nn.Module:
    """float32 model whose weights and BatchNorm statistics are exact in both half types."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model.train()
    model(torch.randn(32, 4))  # non-trivial running statistics
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())
    return model.eval()


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 4, generator=g).to(torch.bfloat16).float()
    return X, torch.randint(0, 3, (40,), generator=g)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("structure", "prior"), [("kron", "parameterwise"), ("kron", "unitwise"), ("diag", "layerwise")]
)
def test_glm_predictive_of_a_half_model_matches_float32(dtype, structure, prior):
    model = _half_exact_model()
    X, y = _data()
    post = sk.fit_laplace(model, (X, y), structure=structure, prior=prior, progress=False)
    expected = glm_predictive(post, X)
    model.to(dtype)  # the posterior was fitted in float32; the model is deployed in half
    got = glm_predictive(post, X.to(dtype), batch_size=16)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=TOLERANCE[dtype])
    assert float((got.float() - expected).abs().max()) > 0  # it really ran in half


@pytest.mark.parametrize("dtype", HALF)
def test_map_predictive_of_a_half_model(dtype):
    model = _half_exact_model()
    X, _ = _data()
    expected = map_predictive(model, X)
    got = map_predictive(model.to(dtype), X.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_fitting_or_training_in_half_precision_is_refused_with_the_reason(dtype):
    X, y = _data()
    model = _half_exact_model().to(dtype)
    with pytest.raises(TypeError, match=f"needs float32 or float64 parameters.*{dtype}"):
        sk.fit_laplace(model, (X.to(dtype), y), prior="parameterwise", progress=False)
    with pytest.raises(TypeError, match=f"marglik_train needs float32 or float64.*{dtype}"):
        sk.marglik_train(model, (X.to(dtype), y), n_epochs=1, progress=False)
