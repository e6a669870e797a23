"""End-to-end training benchmarks (BENCH.md §1, last paragraph), pytest-benchmark.

    python -m pytest bench/bench_training.py              # BENCH sizes (meant for a GPU)
    python -m pytest bench/bench_training.py --quick      # small sizes, a CPU check

MLP 784-1024-1024-10, N = 20480, 5 epochs, Adam, batch 256 through a DataLoader: plain MAP
training (a hand-written loop, the denominator), MAP through ``marglik_train`` (burn-in past
the end), SpaM with a marglik step (Kron, exact GGN, layerwise prior, 100 hypersteps) every
epoch and every 5 epochs — from the DataLoader and from in-memory tensors — and
laplace-torch's ``marglik_training`` (AsdlGGN) at the same frequencies. Targets: SpaM ≤ 1.5×
MAP with a step every epoch, ≤ 1.15× every 5 epochs. ``python bench/training_ratios.py
RESULT.json`` prints the ratios.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from curvature_baselines import mlp
from torch.utils.data import DataLoader, TensorDataset

import spamkern as sk

HAS_LAPLACE = importlib.util.find_spec("laplace") is not None


class TrainingWork:
    def __init__(self, sizes, device: torch.device):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.model = mlp(sizes.mlp_width).to(device)
        n = sizes.mlp_n
        X, y = torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        pin = device.type == "cuda"
        self.loader = DataLoader(
            TensorDataset(X, y), batch_size=sizes.mlp_batch, shuffle=True, pin_memory=pin
        )
        self.X, self.y = X.to(device), y.to(device)
        self.batch, self.device = sizes.mlp_batch, device
        self.epochs = 2 if sizes.quick else 5

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)


_WORK: list[TrainingWork] = []


@pytest.fixture
def work(sizes, device) -> TrainingWork:
    if not _WORK:
        _WORK.append(TrainingWork(sizes, device))
    return _WORK[0]


def _tag(benchmark, work: TrainingWork, case: str) -> None:
    benchmark.group = "training mlp"
    benchmark.extra_info.update(model="mlp", case=case, epochs=work.epochs)


def _device_loader(work: TrainingWork):
    """The DataLoader's batches moved to the device (what a user's loop does)."""

    class Moved:
        def __init__(self, loader):
            self.loader, self.dataset = loader, loader.dataset

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for x, y in self.loader:
                yield x.to(work.device, non_blocking=True), y.to(work.device, non_blocking=True)

    return Moved(work.loader)


def test_map_plain_torch(benchmark, timed, work):
    _tag(benchmark, work, "map_plain_torch")

    def train():
        model = work.fresh()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(work.epochs):
            for x, y in _device_loader(work):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    timed(train, rounds=2)


def test_map_spamkern(benchmark, timed, work):
    _tag(benchmark, work, "map_spamkern")
    timed(lambda: sk.marglik_train(
        work.fresh(), _device_loader(work), n_epochs=work.epochs, n_epochs_burnin=work.epochs + 1,
        scheduler=None, fit_final_posterior=False, progress=False), rounds=2)  # fmt: skip


@pytest.mark.parametrize("frequency", [1, 5])
@pytest.mark.parametrize("source", ["loader", "tensors"])
def test_spam_training(benchmark, timed, work, frequency, source):
    _tag(benchmark, work, f"spam_every_{frequency}_{source}")
    data = _device_loader(work) if source == "loader" else (work.X, work.y)
    timed(lambda: sk.marglik_train(
        work.fresh(), data, n_epochs=work.epochs, marglik_frequency=frequency, n_hypersteps=100,
        structure="kron", curvature="ggn", prior="layerwise", scheduler=None,
        batch_size=work.batch, fit_final_posterior=False, progress=False), rounds=2)  # fmt: skip


@pytest.mark.skipif(not HAS_LAPLACE, reason="laplace-torch is not installed")
@pytest.mark.parametrize("frequency", [1, 5])
def test_laplace_marglik_training(benchmark, timed, work, frequency):
    from laplace.curvature import AsdlGGN
    from laplace.marglik_training import marglik_training

    _tag(benchmark, work, f"laplace_AsdlGGN_every_{frequency}")
    timed(lambda: marglik_training(
        work.fresh(), work.loader, likelihood="classification", hessian_structure="kron",
        backend=AsdlGGN, n_epochs=work.epochs, marglik_frequency=frequency,
        n_hypersteps=100, prior_structure="layerwise", progress_bar=False), rounds=1)  # fmt: skip
