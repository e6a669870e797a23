"""Curvature harvested from the training sweep equals a refit when θ does not move;
data-only input factors are reused; resume stays bit-exact with harvesting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spamkern as sk
from spamkern.curvature.accumulate import accumulate_curvature
from spamkern.curvature.harvest import EpochHarvest, InputFactors
from spamkern.curvature.structure import parameter_blocks
from spamkern.data.batches import TensorBatches


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        layers = [nn.Flatten(), nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 3)]
    else:
        layers = [nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)]
    return nn.Sequential(*layers).double()


def _data(n: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=g)


def _assert_same_factors(a, b):
    for fa, fb in zip(a.kron_factors, b.kron_factors):
        for x, z in zip(fa, fb):
            torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-14)


def _assert_same_means(mine: dict, ref: dict, n_weights: int):
    """Every weight's recorded input mean E[a] (what data-free reconstruction absorbs)."""
    assert sorted(mine) == sorted(ref) and len(ref) == n_weights
    for index in ref:
        torch.testing.assert_close(mine[index], ref[index], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize(("cache", "batch_size"), [(True, 8), (False, 8), (True, 7)])
def test_ef_harvested_at_zero_learning_rate_equals_a_refit(kind, cache, batch_size):
    """lr = 0: θ never moves, so the epoch's EF factors, loss and evidence are the refit's;
    the second marglik epoch reuses the first layer's data-only A when caching. Batch size
    7 leaves a shorter last batch (its gradients are rescaled by a different B)."""
    model, (X, y) = _model(kind), _data()
    res = sk.marglik_train(
        model, (X, y), n_epochs=2, lr=0.0, curvature="ef", curvature_source="epoch",
        n_hypersteps=0, batch_size=batch_size, fit_final_posterior=False, progress=False,
        cache_input_factors=cache, prior_precision=0.7,
    )  # fmt: skip
    refit = sk.fit_laplace(
        model, (X, y), curvature="ef", prior="layerwise", prior_precision=0.7, progress=False
    )
    _assert_same_factors(res.posterior, refit)
    _assert_same_means(res.posterior.curvature.input_means, refit.curvature.input_means, 2)
    torch.testing.assert_close(
        res.posterior.curvature.loss, refit.curvature.loss, rtol=1e-13, atol=0
    )
    torch.testing.assert_close(
        res.posterior.log_marginal_likelihood(), refit.log_marginal_likelihood(), rtol=1e-12, atol=0
    )


def test_mc_harvest_equals_the_refit_pass_for_the_same_draws():
    """Same batches, same generator state: the extra backward of sampled labels gives the
    refit pass's MC-GGN factors (and the training backward is left intact)."""
    model, (X, y) = _model("mlp"), _data()
    blocks = parameter_blocks(model, "kron")
    batches = TensorBatches(X, y, 8)
    with EpochHarvest(blocks, "ggn-mc", torch.Generator().manual_seed(5)) as harvest:
        for xb, yb in batches:
            model.zero_grad()
            f = model(xb)
            loss = F.cross_entropy(f, yb)
            harvest.before_backward(f, yb)
            loss.backward()
            harvest.after_backward(f, loss.detach() * f.shape[0], float(f.shape[0]))
    mine = harvest.curvature()
    ref = accumulate_curvature(
        model, batches, blocks, "classification", "ggn-mc", torch.Generator().manual_seed(5)
    )
    for index in ref.factors:
        for x, z in zip(mine.factors[index], ref.factors[index]):
            torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-14)
    _assert_same_means(mine.input_means, ref.input_means, 2)
    torch.testing.assert_close(mine.loss, ref.loss, rtol=1e-13, atol=0)


def test_input_factors_are_found_for_data_fed_layers_only_and_reused_by_refits():
    model, (X, y) = _model("mlp"), _data()
    blocks = parameter_blocks(model, "kron")
    cache = InputFactors(blocks)
    assert cache.detect(model, X[:4]) == [0]  # Flatten → Linear: the data alone
    first = sk.fit_laplace(model, (X, y), curvature="ggn", progress=False)
    cache.update(first.curvature)
    assert cache.given()[0] is first.curvature.factors[0][1]
    with torch.no_grad():  # θ moves: only the data-only A stays
        for p in model.parameters():
            p.add_(0.1)
    again = sk.fit_laplace(model, (X, y), progress=False, input_factors=cache.given())
    fresh = sk.fit_laplace(model, (X, y), progress=False)
    _assert_same_factors(again, fresh)
    # the kept A is decomposed once: the second posterior reuses the first one's eigenvalues
    # (all the evidence needs) and, once asked for, its eigenvectors
    first.log_marginal_likelihood(), again.log_marginal_likelihood()
    assert again.curvature_blocks[0].values[1] is first.curvature_blocks[0].values[1]
    assert first.curvature_blocks[0].vectors is None  # no eigenvectors for the evidence
    assert again.curvature_blocks[0].basis()[1] is first.curvature_blocks[0].basis()[1]
    torch.testing.assert_close(
        again.log_marginal_likelihood(), fresh.log_marginal_likelihood(), rtol=1e-12, atol=0
    )
    assert InputFactors(blocks, enabled=False).detect(model, X[:4]) == []


@pytest.mark.parametrize("curvature", ["ef", "ggn-mc"])
def test_resume_with_harvested_curvature_is_bit_exact(tmp_path, curvature):
    X, y = _data(45)
    kwargs = dict(
        n_epochs=3, n_hypersteps=3, batch_size=10, curvature=curvature, curvature_source="epoch",
        lr=0.05, progress=False, seed=7,
    )  # fmt: skip
    full = sk.marglik_train(_model("mlp", 2), (X, y), **kwargs)

    def stop_after_one(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        sk.marglik_train(
            _model("mlp", 2), (X, y), **kwargs, checkpoint_path=ckpt, on_epoch_end=stop_after_one
        )
    resumed = sk.marglik_train(
        _model("mlp", 2), (X, y), **kwargs, checkpoint_path=ckpt, resume=True
    )
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(full.prior.log_precision, resumed.prior.log_precision)
    assert [h["marglik"] for h in full.history] == [h["marglik"] for h in resumed.history]


def test_regression_ef_harvest_drops_the_noise_factor_like_a_refit():
    """The training loss carries 1/σ²; the harvested EF must not (σ is applied later)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    res = sk.marglik_train(
        model, (X, y), likelihood="regression", sigma_noise=0.5, learn_sigma=False, n_epochs=1,
        lr=0.0, curvature="ef", curvature_source="epoch", n_hypersteps=0, batch_size=8,
        fit_final_posterior=False, progress=False,
    )  # fmt: skip
    refit = sk.fit_laplace(
        model, (X, y), likelihood="regression", curvature="ef", sigma_noise=0.5, progress=False
    )
    _assert_same_factors(res.posterior, refit)
    torch.testing.assert_close(
        res.posterior.log_marginal_likelihood(), refit.log_marginal_likelihood(), rtol=1e-12, atol=0
    )


class _ReusedBuffer:
    """A loader that writes every batch into the same two tensors, as streaming or
    pinned-memory loaders may: rows kept across batches must be copies."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.X, self.y, self.batch_size = X, y, batch_size

    def __iter__(self):
        xb, yb = self.X[: self.batch_size].clone(), self.y[: self.batch_size].clone()
        for start in range(0, self.X.shape[0], self.batch_size):
            xb.copy_(self.X[start : start + self.batch_size])
            yb.copy_(self.y[start : start + self.batch_size])
            yield xb, yb

    def __len__(self) -> int:
        return self.X.shape[0] // self.batch_size


def test_ef_harvest_is_exact_when_the_loader_reuses_its_batch_tensors():
    model, (X, y) = _model("mlp"), _data()
    res = sk.marglik_train(
        model, _ReusedBuffer(X, y, 8), n_epochs=1, lr=0.0, curvature="ef",
        curvature_source="epoch", n_hypersteps=0, fit_final_posterior=False, progress=False,
        prior_precision=0.7,
    )  # fmt: skip
    refit = sk.fit_laplace(
        model, (X, y), curvature="ef", prior="layerwise", prior_precision=0.7, progress=False
    )
    _assert_same_factors(res.posterior, refit)
    _assert_same_means(res.posterior.curvature.input_means, refit.curvature.input_means, 2)
