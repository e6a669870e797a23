"""The training step without a prior graph, online pruning's returned posterior, the
cosine schedule over the true number of steps, and argument validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spamkern as sk
from spamkern.data.batches import TensorBatches
from spamkern.pruning import OnlinePruning, prune, random_scores


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()


def _data(n: int = 53, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-tensor-delta", "one-delta"])
def test_prior_gradient_without_graph_matches_the_graph_built_objective(shared, optimizer):
    """mean CE + (T/2N) Σ δθ² by autograd (the objective as written) vs marglik_train's
    (T/N)·δ∘θ — added after backward, or as the fused optimiser's weight decay when every
    tensor has one δ: same parameters after several steps, masks included."""
    X, y = _data()
    T, bs, seed, lr = 0.5, 16, 3, 0.02
    delta = torch.tensor([0.5, 2.0, 3.0, 0.25], dtype=torch.float64)  # one per tensor
    if shared:
        delta = torch.full((4,), 1.5, dtype=torch.float64)
    model = _mlp()
    masks = prune(model, random_scores(model), 0.3)
    reference = _mlp()
    sk.apply_masks(reference, masks)
    if optimizer == "adam":
        opt = torch.optim.Adam(reference.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    batches = TensorBatches(X, y, bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    params = dict(reference.named_parameters())
    for _ in range(3):
        for xb, yb in batches:
            opt.zero_grad()
            penalty = sum(T * d * p.square().sum() for d, p in zip(delta, reference.parameters()))
            (F.cross_entropy(reference(xb), yb) + penalty / (2 * X.shape[0])).backward()
            opt.step()
            with torch.no_grad():
                for name, keep in masks.items():
                    params[name].masked_fill_(~keep, 0)

    sk.marglik_train(
        model, (X, y), n_epochs=3, n_epochs_burnin=10, prior_precision=delta / T,
        temperature=T, lr=lr, batch_size=bs, seed=seed, scheduler=None, masks=masks,
        optimizer=optimizer, momentum=0.9,
        fit_final_posterior=False, progress=False,
    )  # fmt: skip
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def _online(fit_final_posterior: bool):
    X, y = _data(64)
    op = OnlinePruning(final_sparsity=0.5, interval=2)
    res = sk.marglik_train(
        _mlp(4), (X, y), n_epochs=4, marglik_frequency=2, n_hypersteps=2, batch_size=16,
        online_pruning=op, fit_final_posterior=fit_final_posterior, progress=False,
    )  # fmt: skip
    assert [h["epoch"] for h in op.history] == [2, 4]  # the last marglik step pruned
    return res


def test_online_pruning_returns_a_posterior_at_the_final_masks():
    res = _online(fit_final_posterior=True)
    theta = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()])
    assert torch.equal(res.posterior.mean, theta)
    assert int((res.posterior.mean == 0).sum()) >= sum(int((~m).sum()) for m in res.masks.values())


def test_online_pruning_without_final_fit_returns_no_stale_posterior():
    assert _online(fit_final_posterior=False).posterior is None


class _Lengthless:
    """A re-iterable of batches without ``__len__`` (e.g. a generator-backed stream)."""

    def __init__(self, X, y, batch_size):
        self.X, self.y, self.batch_size = X, y, batch_size

    def __iter__(self):
        for start in range(0, self.X.shape[0], self.batch_size):
            yield self.X[start : start + self.batch_size], self.y[start : start + self.batch_size]


def test_cosine_schedule_decays_over_the_steps_of_length_less_data():
    X, y = _data(64)
    lr, n_epochs = 0.01, 3  # 4 steps per epoch
    res = sk.marglik_train(
        _mlp(), _Lengthless(X, y, 16), n_epochs=n_epochs, n_epochs_burnin=10, lr=lr,
        fit_final_posterior=False, progress=False,
    )  # fmt: skip
    expected = [lr * (1 + math.cos(math.pi * e / n_epochs)) / 2 for e in range(1, n_epochs + 1)]
    assert [h["lr"] for h in res.history] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"curvature_source": "batch"}, "curvature_source must be one of"),
        ({"curvature": "ggn", "curvature_source": "epoch"}, "needs curvature_source='refit'"),
        ({"hyper_optimizer": "lbfgs"}, "hyper_optimizer must be one of"),
        ({"lr": -1.0}, "lr >= 0"),
    ],
)
def test_bad_training_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sk.marglik_train(_mlp(), _data(), **{"n_epochs": 1, "progress": False, **kwargs})


def test_epoch_curvature_refuses_tensors_outside_linear_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Linear(9, 3)).double()
    with pytest.raises(ValueError, match=r"\['1.weight', '1.bias'\].*'refit'"):
        sk.marglik_train(
            model, _data(), n_epochs=1, curvature="ef", curvature_source="epoch", progress=False
        )
