"""Shared set-up of the benchmark suite: sizes, devices, data, timing with sync, results.

``pytest bench`` (``make bench``) collects every ``bench/bench_*.py``. Without a GPU the
small sizes are the default (``--quick``: the suite checks that each case runs, in minutes,
and its numbers are not GPU numbers); ``--full`` forces the full sizes on the CPU. On a GPU
the full sizes are the default. ``--benchmark-json`` files carry the card, the versions and
the date (``pytest_benchmark_update_json`` below), so every results file says where and
when it was measured.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from spamkern import dispatch

dispatch.available_backends("gram")  # register every kernel now (failures are warned once)


def pytest_addoption(parser):
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="small sizes for a CPU check of the benchmarks (not GPU numbers); the default "
        "without a GPU",
    )
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="full sizes even without a GPU (slow on a CPU)",
    )


def quick_mode(config) -> bool:
    """Small sizes: asked for, or no GPU and full sizes not forced."""
    if config.getoption("--quick"):
        return True
    return not torch.cuda.is_available() and not config.getoption("--full")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of already formatted cells (the scripts print their results so)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


RESULTS = Path(__file__).parent / "results"


def headless_pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def script_parser(doc: str, quick_help: str, repeats: int | None = None):
    """The options every CPU benchmark script takes: ``--quick`` (what it shrinks),
    ``--out`` and, with a default count, ``--repeats`` (≥ 1)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if repeats is not None:
        parser.add_argument(
            "--repeats", type=_positive, default=repeats, help="best of this many per case"
        )
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    return parser


def save_results(
    result: dict,
    out: Path | None,
    stem: str,
    quick: bool = False,
    plot: Callable[[dict, Path], None] | None = None,
    indent: int = 1,
) -> Path:
    """Write ``result`` as JSON to ``out`` (default ``bench/results/<stem>[-quick].json``),
    its plot beside it as .png, and say where."""
    out = out or RESULTS / f"{stem}{'-quick' if quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent) + "\n")
    written = [out]
    if plot is not None:
        plot(result, out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    print("wrote " + " and ".join(str(path) for path in written))
    return out


def time_call(fn, *args) -> float:
    """Wall-clock seconds of one call ``fn(*args)``."""
    tic = time.perf_counter()
    fn(*args)
    return time.perf_counter() - tic


def in_turn(first, second, repeats: int) -> list[tuple[float, float]]:
    """[(seconds of ``first()``, seconds of ``second()``)] for ``repeats`` calls of each, run
    in turn: the machine's drifting load reaches both alike, so their best runs compare."""
    return [(time_call(first), time_call(second)) for _ in range(repeats)]


def run_conditions() -> dict:
    """Card, versions, threads, date and load of this run, for every results file."""
    import datetime
    import importlib.metadata
    import os
    import platform

    from spamkern.sparse import tables

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "card": tables.card_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "laplace-torch": version("laplace-torch"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_per_core": round(tables.load_per_core(), 2),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["spamkern_run"] = run_conditions() | {"quick": quick_mode(config)}


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
    return QUICK if quick_mode(request.config) else FULL


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
