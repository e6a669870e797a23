"""Shared set-up of the curvature benchmarks: sizes, devices, data, timing with sync.

``--quick`` shrinks the data and the widths so the suite runs on a CPU in a minute or two
to check that it works; those numbers are not GPU numbers and say nothing about the
BENCH.md targets. Without it, the BENCH.md §1 sizes are used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from spamkern import dispatch


def _register_kernels() -> None:
    """Make the Triton kernels visible to the dispatcher in a source checkout too."""
    with contextlib.suppress(ImportError):
        dispatch.load_kernels()


_register_kernels()


def pytest_addoption(parser):
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="small sizes for a CPU check of the curvature benchmarks (not GPU numbers)",
    )


@dataclass(frozen=True)
class Sizes:
    mlp_width: int
    mlp_n: int
    mlp_batch: int
    cnn_n: int
    cnn_batch: int
    cnn_channels: tuple[int, int, int]
    cnn_hw: int
    rounds: int
    quick: bool = False


FULL = Sizes(1024, 20480, 256, 10240, 128, (64, 128, 128), 32, rounds=5)
QUICK = Sizes(256, 1024, 256, 256, 128, (16, 32, 32), 16, rounds=2, quick=True)


@pytest.fixture(scope="session")
def sizes(request) -> Sizes:
    return QUICK if request.config.getoption("--quick") else FULL


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    torch.set_num_threads(1)  # 2 threads are slower and noisier than 1 on the CI box
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn, rounds, setup=None, warmup=1)``: pytest-benchmark, device synchronised."""

    def run_timed(fn, rounds: int, setup=None, warmup: int = 1):
        def run(*args):
            out = fn(*args)
            synchronize(device)
            return out

        if setup is None:
            return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
        return benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=warmup)

    return run_timed


@pytest.fixture
def sync(device):
    """Synchronise the benchmark device (a no-op on the CPU)."""
    return lambda: synchronize(device)
