"""Bad input gets a clear error that says what was wrong and what is accepted."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import spamkern as sk

from . import models as M

F64 = torch.float64


@pytest.fixture
def mlp_data():
    return M.mlp(seed=0)


def _labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize(
    ("layer", "x_shape", "what"),
    [
        (nn.Conv3d(2, 3, 2), (4, 2, 3, 3, 3), "Conv3d"),
        (nn.ConvTranspose2d(2, 1, 2), (4, 2, 3, 3), "ConvTranspose2d"),
    ],
)
def test_layer_without_kronecker_factorisation(layer, x_shape, what):
    model = nn.Sequential(nn.Identity(), layer, nn.Flatten(), nn.LazyLinear(3)).to(F64)
    X = torch.randn(x_shape, dtype=F64)
    model(X)  # materialise the lazy layer
    with pytest.raises(ValueError, match="module '1'") as info:
        sk.fit_laplace(model, (X, _labels(4)), structure="kron")
    message = str(info.value)
    assert what in message and "structure='diag'" in message and "requires_grad=False" in message
    # freezing the layer is the other way out
    for p in layer.parameters():
        p.requires_grad_(False)
    post = sk.fit_laplace(model, (X, _labels(4)), structure="kron")
    assert post.n_params == 3 * model[3].in_features + 3


class _NotVmappable(nn.Module):
    """Data-dependent control flow: per-sample gradients through torch.func cannot be formed."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        out = self.lin(x)
        return out * self.gain if bool((x > 0).any()) else out


def test_module_whose_per_sample_gradients_fail(mlp_data):
    _, X, y = mlp_data
    with pytest.raises(ValueError, match=r"per-sample gradients .* \['gain'\]"):
        sk.fit_laplace(_NotVmappable().to(F64), (X, y), structure="kron")


class _InfiniteGradient(nn.Module):
    """Finite outputs whose gradient w.r.t. ``b`` is infinite (√ at 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = self.b(x)
        return self.a(x) + torch.sqrt(h - h.detach())


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_non_finite_loss_or_curvature(mlp_data, structure):
    model, X, y = mlp_data
    X_nan = X.clone()
    X_nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the training loss is not finite \(nan\)"):
        sk.fit_laplace(model, (X_nan, y), structure=structure)
    with pytest.raises(ValueError, match=r"curvature of parameter 'b\.weight' contains NaN or Inf"):
        sk.fit_laplace(_InfiniteGradient().to(F64), (X, y), structure=structure)


@pytest.mark.parametrize(
    ("entries", "finite"),
    [
        ([1.0, 2.0], True),
        ([3e38, 3e38], True),  # finite entries whose float32 sum overflows
        ([1.0, float("nan")], False),
        ([float("inf"), -float("inf")], False),
        ([float("inf"), 1.0], False),
    ],
)
def test_the_finite_screen_of_curvature_factors(entries, finite):
    from spamkern.ops.reductions import all_finite

    assert all_finite(torch.tensor(entries, dtype=torch.float32)) is finite


def test_prior_precision_that_does_not_fit(mlp_data):
    model, X, y = mlp_data
    n_tensors = len(list(model.parameters()))
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"length 1, {n_tensors} .*got length 4"):
        sk.fit_laplace(model, (X, y), prior="layerwise", prior_precision=torch.ones(4))
    with pytest.raises(
        ValueError, match=rf"cannot take one precision per parameter \(length {n_params}\)"
    ):
        sk.fit_laplace(model, (X, y), prior="unitwise", prior_precision=torch.ones(n_params))
    with pytest.raises(ValueError, match="scalar or a vector, got \\(2, 3\\)"):
        sk.fit_laplace(model, (X, y), prior_precision=torch.ones(2, 3))
    with pytest.raises(ValueError, match="the given values differ"):
        sk.fit_laplace(
            model, (X, y), prior="scalar", prior_precision=torch.arange(1.0, 1.0 + n_tensors)
        )
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            sk.fit_laplace(model, (X, y), prior_precision=bad)
    post = sk.fit_laplace(model, (X, y), prior="parameterwise")
    with pytest.raises(ValueError, match=rf"or {n_params} \(one per parameter\); got length 5"):
        post.log_marginal_likelihood(prior_precision=torch.ones(5))
    other, _, _ = M.mlp(seed=1, widths=(6,))
    foreign = sk.fit_laplace(other, (X, y)).prior
    with pytest.raises(ValueError, match="prior was built for other parameters"):
        sk.fit_laplace(model, (X, y), prior=foreign)


def test_empty_data(mlp_data):
    model, X, y = mlp_data
    with pytest.raises(ValueError, match=re.escape("yielded no batches (empty loader)")):
        sk.fit_laplace(model, [])
    with pytest.raises(ValueError, match=re.escape("yielded no batches (empty loader)")):
        sk.fit_laplace(model, [(X[:0], y[:0])])
    with pytest.raises(ValueError, match=re.escape("empty (X has 0 rows)")):
        sk.fit_laplace(model, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="X has 13 rows but y has 5"):
        sk.fit_laplace(model, (X, y[:5]))


def test_labels_and_targets(mlp_data):
    model, X, y = mlp_data
    for labels, shown in ((y + 3, r"\[3, 5\]"), (y - 1, r"\[-1, 1\]")):
        with pytest.raises(
            ValueError, match=rf"labels must lie in \[0, 2\] .*got labels in {shown}"
        ):
            sk.fit_laplace(model, (X, labels))
    with pytest.raises(
        TypeError, match="class labels must be an integer tensor, got torch.float64"
    ):
        sk.fit_laplace(model, (X, y.to(F64)))
    with pytest.raises(
        ValueError, match=r"\(batch,\) vector of class indices, got shape \(13, 1\)"
    ):
        sk.fit_laplace(model, (X, y[:, None]))
    with pytest.raises(
        ValueError, match=r"targets must have the outputs' shape \(13, 3\), got \(13, 2\)"
    ):
        sk.fit_laplace(model, (X, torch.randn(13, 2, dtype=F64)), likelihood="regression")


def test_bad_options_and_batches(mlp_data):
    model, X, y = mlp_data
    cases = [
        ({"structure": "full"}, "structure must be one of ('kron', 'diag'), got 'full'"),
        ({"curvature": "hessian"}, "curvature must be one of ('ggn', 'ggn-mc', 'ef')"),
        ({"likelihood": "poisson"}, "likelihood must be one of ('classification', 'regression')"),
        (
            {"prior": "horseshoe"},
            "prior must be one of ('scalar', 'layerwise', 'unitwise', 'parameterwise')",
        ),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"sigma_noise": 2.0}, "sigma_noise applies to regression only"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            sk.fit_laplace(model, (X, y), **kwargs)
    with pytest.raises(
        ValueError, match=re.escape("must hold its targets under 'labels'; keys: ['x', 'y']")
    ):
        sk.fit_laplace(model, [{"x": X, "y": y}])
    with pytest.raises(TypeError, match="tuple \\(X, y\\) of tensors, not a single tensor"):
        sk.fit_laplace(model, X)
    with pytest.raises(ValueError, match="sigma_noise can only be given for regression"):
        sk.fit_laplace(model, (X, y)).log_marginal_likelihood(sigma_noise=2.0)
    with pytest.raises(AttributeError, match="kron_factors exists for structure='kron' only"):
        sk.fit_laplace(model, (X, y), structure="diag").kron_factors  # noqa: B018
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sk.fit_laplace(model, (X, y))
