"""Training data: every form is walked once per epoch with the right N, or refused clearly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import spamkern as sk
from spamkern.data.batches import epoch_size

KWARGS = dict(n_epochs=2, n_hypersteps=2, optimizer="sgd", lr=0.05, progress=False)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _same_run(a, b) -> None:
    for (_, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert a.marglik == b.marglik
    assert a.posterior.n_data == b.posterior.n_data


class Stream(IterableDataset):
    """An iterable-style data set: no len(), a fresh pass on every iter()."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        return iter(zip(self.X, self.y))


class Batches:
    """A re-iterable of batches without __len__ (e.g. a custom streaming reader)."""

    def __init__(self, X, y, size):
        self.X, self.y, self.size = X, y, size

    def __iter__(self):
        for i in range(0, len(self.y), self.size):
            yield self.X[i : i + self.size], self.y[i : i + self.size]


def test_a_loader_over_an_iterable_dataset_trains_like_a_map_style_one():
    X, y = _data()
    stream = sk.marglik_train(_mlp(), DataLoader(Stream(X, y), batch_size=6), **KWARGS)
    mapped = sk.marglik_train(_mlp(), DataLoader(TensorDataset(X, y), batch_size=6), **KWARGS)
    _same_run(stream, mapped)


def test_the_cosine_schedule_decays_over_batches_of_a_lengthless_iterable():
    X, y = _data()
    res = sk.marglik_train(_mlp(), Batches(X, y, 6), **{**KWARGS, "n_epochs": 3})
    # 4 steps per epoch, 12 in all: the learning rate ends at 0 and never rises
    lrs = [h["lr"] for h in res.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    listed = sk.marglik_train(_mlp(), list(Batches(X, y, 6)), **{**KWARGS, "n_epochs": 3})
    _same_run(res, listed)


@pytest.mark.parametrize(
    "loader_kwargs",
    [
        {"batch_size": 6, "drop_last": True},  # 18 of 20 samples per epoch
        {"batch_size": 5, "sampler": list(range(10))},  # a subset: 10 of 20
    ],
)
def test_n_counts_the_samples_an_epoch_really_sees(loader_kwargs):
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), **loader_kwargs)
    seen = [b[1] for b in loader]
    n = sum(len(t) for t in seen)
    size = epoch_size(loader)
    assert (size.n_data, size.n_batches) == (n, len(seen))
    res = sk.marglik_train(_mlp(), loader, **KWARGS)
    # the same batches as an explicit list: same prior term T/(2N), same result
    explicit = sk.marglik_train(_mlp(), list(loader), **KWARGS)
    _same_run(res, explicit)
    assert res.posterior.n_data == n


def test_a_one_shot_generator_is_refused():
    X, y = _data()
    gen = ((X[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5))
    with pytest.raises(TypeError, match="one-shot iterator"):
        sk.marglik_train(_mlp(), gen, **KWARGS)


def test_a_generator_is_fine_for_one_pass_fits():
    X, y = _data()
    post = sk.fit_laplace(_mlp(), ((X[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)))
    assert post.n_data == 20


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_integer_labels_of_any_width_train_like_int64(dtype):
    X, y = _data()
    expected = sk.marglik_train(_mlp(), (X, y), **KWARGS)
    _same_run(sk.marglik_train(_mlp(), (X, y.to(dtype)), **KWARGS), expected)
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    expected = sk.marglik_train(_mlp(), loader, **KWARGS)
    loader = DataLoader(TensorDataset(X, y.to(dtype)), batch_size=10)
    _same_run(sk.marglik_train(_mlp(), loader, **KWARGS), expected)


def test_an_iterable_that_is_exhausted_after_one_pass_is_caught():
    X, y = _data()

    class OnePass:  # re-iterable in form, empty after the first pass
        def __init__(self):
            self.it = iter([(X[:10], y[:10]), (X[10:], y[10:])])

        def __iter__(self):
            return self.it

    with pytest.raises(ValueError, match="yielded no batches in epoch 1"):
        sk.marglik_train(_mlp(), OnePass(), **KWARGS)


@pytest.mark.parametrize(
    "data",
    [
        DataLoader(TensorDataset(*_data(0)), batch_size=4),
        DataLoader(Stream(*_data(0)), batch_size=4),
        [],
    ],
    ids=["map-style", "iterable-style", "list"],
)
def test_empty_training_data_is_refused(data):
    with pytest.raises(ValueError, match="the training data is empty"):
        sk.marglik_train(_mlp(), data, **KWARGS)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "8"])
def test_bad_batch_sizes_are_refused_not_replaced(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sk.marglik_train(_mlp(), _data(), batch_size=batch_size, **KWARGS)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sk.fit_laplace(_mlp(), _data(), batch_size=batch_size, progress=False)


def test_a_batch_size_a_loader_cannot_honour_is_not_silently_ignored():
    loader = DataLoader(TensorDataset(*_data()), batch_size=6)
    with pytest.warns(UserWarning, match="batch_size=3 is ignored.*its own batch_size=6"):
        sk.marglik_train(_mlp(), loader, batch_size=3, **KWARGS)
    with pytest.warns(UserWarning, match="batch_size=3 is ignored.*list yields its own"):
        sk.fit_laplace(_mlp(), list(loader), batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.marglik_train(_mlp(), loader, batch_size=6, **KWARGS)  # the loader's own: fine


def test_inputs_in_another_dtype_or_with_nan_are_refused_up_front():
    X, y = _data()
    with pytest.raises(TypeError, match="X is torch.float32 but the model's parameters are"):
        sk.marglik_train(_mlp(), (X.float(), y), **KWARGS)
    with pytest.raises(TypeError, match="X is torch.float32 but the model's parameters are"):
        sk.fit_laplace(_mlp(), (X.float(), y))
    X[7, 2] = math.nan
    with pytest.raises(ValueError, match=r"X contains NaN or Inf in 1 rows \(first: \[7\]\)"):
        sk.marglik_train(_mlp(), (X, y), **KWARGS)


def test_labels_out_of_range_in_a_loader_are_refused():
    X, y = _data()
    y[13] = 3
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        sk.marglik_train(_mlp(), loader, **KWARGS)


class DictModel(nn.Module):
    """A model that takes the whole dict batch (as with tokenised inputs)."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, batch):
        return self.net(batch["features"])


def test_dict_batches_are_counted_with_their_own_target_key():
    X, y = _data()
    batches = [{"features": X[i : i + 5], "target": y[i : i + 5]} for i in range(0, 20, 5)]
    res = sk.marglik_train(DictModel(), batches, dict_key_y="target", **KWARGS)
    plain = sk.marglik_train(_mlp(), [(b["features"], b["target"]) for b in batches], **KWARGS)
    _same_run(res, plain)


def test_regression_targets_with_nan_are_refused_up_front():
    X, _ = _data()
    y = X[:, :3].clone()
    y[4, 1] = math.inf
    with pytest.raises(ValueError, match="regression targets y contain NaN or Inf"):
        sk.marglik_train(_mlp(), (X, y), likelihood="regression", **KWARGS)


def test_parameters_on_two_devices_are_refused():
    model = _mlp()
    model[2].to("meta")
    with pytest.raises(ValueError, match="all trainable parameters on one device"):
        sk.marglik_train(model, _data(), **KWARGS)


@pytest.mark.parametrize(
    "convert", [lambda t: t.numpy(), lambda t: t.tolist()], ids=["numpy", "list"]
)
def test_a_pair_that_is_not_two_tensors_is_named(convert):
    X, y = _data()
    with pytest.raises(TypeError, match=r"tuple \(X, y\) of torch tensors, got \(Tensor, "):
        sk.fit_laplace(_mlp(), (X, convert(y)))
    with pytest.raises(TypeError, match=r"tuple \(X, y\) of torch tensors, got \((ndarray|list), "):
        sk.marglik_train(_mlp(), (convert(X), y), **KWARGS)


@pytest.mark.parametrize(
    "dataset", [TensorDataset(*_data()), Stream(*_data())], ids=["map", "iterable"]
)
def test_a_dataset_instead_of_a_loader_is_named(dataset):
    with pytest.raises(TypeError, match="a data set of single samples.*DataLoader"):
        sk.marglik_train(_mlp(), dataset, **KWARGS)
    with pytest.raises(TypeError, match="a data set of single samples.*DataLoader"):
        sk.fit_laplace(_mlp(), dataset)
