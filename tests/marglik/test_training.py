"""marglik_train: schedule, MAP baseline, resume exactness, learning σ, errors, digits run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spamkern as sk
from spamkern.marglik import is_marglik_epoch


def _mlp(seed: int, d_in: int = 6, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 9), nn.Tanh(), nn.Linear(9, d_out)).double()


def _data(n: int = 53, d_in: int = 6, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def test_marglik_epochs_follow_burnin_and_frequency():
    fired = [e for e in range(1, 13) if is_marglik_epoch(e, n_epochs_burnin=4, marglik_frequency=3)]
    assert fired == [6, 9, 12]


def test_history_records_marglik_only_at_marglik_epochs():
    res = sk.marglik_train(
        _mlp(0),
        _data(),
        n_epochs=6,
        n_epochs_burnin=2,
        marglik_frequency=2,
        n_hypersteps=5,
        batch_size=16,
        progress=False,
    )
    assert [h["epoch"] for h in res.history if h["marglik"] is not None] == [2, 4, 6]
    assert res.model.training  # back in train mode after the marglik steps


def test_map_baseline_keeps_prior_fixed_and_still_fits_a_posterior():
    res = sk.marglik_train(
        _mlp(0),
        _data(),
        n_epochs=3,
        n_epochs_burnin=10,
        prior="unitwise",
        prior_precision=2.0,
        temperature=0.5,
        batch_size=16,
        progress=False,
    )
    assert all(h["marglik"] is None for h in res.history)
    # unitwise initial value: a_m + b_n = log(T · prior_precision) for every weight entry
    torch.testing.assert_close(
        res.prior.precision_diag(), torch.full((res.posterior.n_params,), 1.0, dtype=torch.float64)
    )
    assert res.posterior is not None and res.posterior.prior is res.prior


def test_hypersteps_increase_the_marglik():
    X, y = _data(n=80)
    model = _mlp(3)
    res = sk.marglik_train(
        model,
        (X, y),
        n_epochs=1,
        n_hypersteps=0,
        batch_size=32,
        progress=False,
        fit_final_posterior=True,
    )
    before = float(res.posterior.log_marginal_likelihood().detach())
    res2 = sk.marglik_train(
        _mlp(3), (X, y), n_epochs=1, n_hypersteps=30, batch_size=32, progress=False
    )
    after = float(res2.posterior.log_marginal_likelihood().detach())
    assert after > before


@pytest.mark.parametrize("data_kind", ["tensors", "loader"])
def test_resume_reproduces_uninterrupted_run(tmp_path, data_kind):
    X, y = _data(n=45)

    def data():
        if data_kind == "tensors":
            return (X, y)
        ds = torch.utils.data.TensorDataset(X, y)
        return torch.utils.data.DataLoader(
            ds, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(5)
        )

    kwargs = dict(
        n_epochs=4,
        marglik_frequency=1,
        n_hypersteps=3,
        batch_size=10,
        curvature="ggn-mc",
        optimizer="sgd",
        lr=0.05,
        progress=False,
        seed=7,
    )
    torch.manual_seed(11)
    full = sk.marglik_train(_mlp(2), data(), **kwargs)

    torch.manual_seed(11)
    ckpt = tmp_path / "run.pt"

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sk.marglik_train(
            _mlp(2), data(), **kwargs, checkpoint_path=ckpt, on_epoch_end=kill_after_two
        )
    torch.manual_seed(999)  # the resumed run must restore every random state itself
    resumed = sk.marglik_train(_mlp(2), data(), **kwargs, checkpoint_path=ckpt, resume=True)

    for (_, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b)
    assert torch.equal(full.prior.log_precision, resumed.prior.log_precision)
    assert [h["marglik"] for h in full.history] == [h["marglik"] for h in resumed.history]


def test_regression_learns_the_noise_level():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    y = X @ w + 0.3 * torch.randn(200, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1)).double()
    res = sk.marglik_train(
        model,
        (X, y),
        likelihood="regression",
        n_epochs=60,
        lr=0.05,
        n_hypersteps=20,
        marglik_frequency=5,
        batch_size=50,
        progress=False,
    )
    assert abs(res.history[-1]["sigma"] - 0.3) < 0.06


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"scheduler": "step"}, "scheduler"),
        ({"marglik_frequency": 0}, "marglik_frequency"),
        ({"resume": True}, "checkpoint_path"),
        ({"prior": "groupwise"}, "prior must be one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sk.marglik_train(_mlp(0), _data(), **{"n_epochs": 1, "progress": False, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hyper_tol": -1e-6}, ValueError, "hyper_tol must be finite and >= 0"),
        ({"hyper_tol": float("nan")}, ValueError, "hyper_tol must be finite and >= 0"),
        ({"hyper_tol": float("inf")}, ValueError, "hyper_tol must be finite and >= 0"),
        ({"hyper_tol": True}, TypeError, "hyper_tol must be a number"),
        ({"hyper_tol": "1e-6"}, TypeError, "hyper_tol must be a number"),
        ({"hyper_tol": 1e-4, "hyper_optimizer": "adam"}, ValueError, "'fixed-point' only"),
    ],
)
def test_bad_hyper_tolerances_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        sk.marglik_train(_mlp(0), _data(), **{"n_epochs": 1, "progress": False, **kwargs})


def test_hyper_tol_trades_evaluations_for_evidence():
    """The first marglik step sees the same posterior in both runs: the looser tolerance
    stops sooner, at an evidence no higher than the default's; the history counts the
    evaluations of every marglik step (none elsewhere)."""

    def run(**kwargs):
        return sk.marglik_train(
            _mlp(0), _data(), n_epochs=3, n_epochs_burnin=2, prior="parameterwise",
            batch_size=16, progress=False, **kwargs,
        )  # fmt: skip

    tight, loose = run(), run(hyper_tol=1e-2)
    assert [h["hyper_evaluations"] for h in tight.history][:1] == [0]
    first_tight, first_loose = tight.history[1], loose.history[1]
    assert first_loose["hyper_evaluations"] < first_tight["hyper_evaluations"]
    assert first_loose["marglik"] <= first_tight["marglik"]


def test_labels_out_of_range_are_refused():
    X, y = _data()
    y[3] = 7
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        sk.marglik_train(_mlp(0), (X, y), n_epochs=1, progress=False)


@pytest.mark.slow
def test_spam_unitwise_kron_on_digits_reaches_95_percent_and_marglik_rises():
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    res = sk.marglik_train(
        model,
        (X[:1437], y[:1437]),
        n_epochs=20,
        prior="unitwise",
        structure="kron",
        lr=3e-3,
        batch_size=64,
        marglik_frequency=5,
        n_epochs_burnin=5,
        n_hypersteps=30,
        progress=False,
    )
    with torch.no_grad():
        accuracy = (model.eval()(X[1437:]).argmax(1) == y[1437:]).double().mean()
    assert accuracy >= 0.95
    assert res.marglik[-1] > res.marglik[0]
