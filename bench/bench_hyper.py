"""Hyperparameter update of one marglik step: 100 Adam steps vs the fixed-point iteration.

    python bench/bench_hyper.py                      # MLP 784-256-256-10, N = 4096, JSON out
    python bench/bench_hyper.py --quick              # small sizes, a smoke check
    python -m pytest bench/bench_hyper.py --quick    # the same cases under pytest-benchmark

One CPU thread. The model is trained briefly on random data, the posterior (Kron, exact GGN)
is fitted once, then for every prior the hyperparameter optimisation alone is timed on that
same posterior from the same starting precisions: wall time, evidence evaluations and the
final log evidence of each method. A training epoch and a curvature refit are timed in the
same run as anchors (the hyper update should cost little next to a refit). The script
writes ``bench/results/cpu-hyper.json``.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import save_results, script_parser  # noqa: E402

import spamkern as sk
from spamkern.marglik.hyper import HYPER_OPTIMIZERS, make_hyper_optimizer
from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior import PRIORS, make_prior

FULL = {"width": 256, "n": 4096, "batch": 128, "train_epochs": 2}
QUICK = {"width": 32, "n": 512, "batch": 128, "train_epochs": 1}


class HyperWork:
    """A briefly trained MLP and its exact-GGN Kron posterior (fitted once)."""

    def __init__(self, width: int, n: int, batch: int, train_epochs: int, seed: int = 0):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, 784, generator=gen)
        self.y = torch.randint(0, 10, (n,), generator=gen)
        self.model = nn.Sequential(
            nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, 10),
        )  # fmt: skip
        self.batch = batch
        self.epoch_s = self._train(train_epochs)
        tic = time.perf_counter()
        self.base = sk.fit_laplace(
            self.model, (self.X, self.y), curvature="ggn", batch_size=batch, progress=False
        )
        self.refit_s = time.perf_counter() - tic

    def _train(self, epochs: int) -> float:
        """Plain Adam MAP epochs; returns the seconds of the last one."""
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        seconds = 0.0
        for _ in range(epochs):
            tic = time.perf_counter()
            for i in torch.randperm(len(self.y)).split(self.batch):
                opt.zero_grad()
                nn.functional.cross_entropy(self.model(self.X[i]), self.y[i]).backward()
                opt.step()
            seconds = time.perf_counter() - tic
        return seconds

    def posterior(self, prior: str) -> LaplacePosterior:
        """A posterior over the same curvature with a fresh prior (precision 1)."""
        named = [(b.name, b.param) for b in self.base.blocks]
        post = LaplacePosterior(
            self.model, self.base.curvature, make_prior(prior, named, 1.0), "classification",
            "kron", "ggn", 1.0,
        )  # fmt: skip
        post.log_evidence()  # eigendecompositions of the factors: part of the fit, not timed
        return post


def run_method(post: LaplacePosterior, method: str, lp0: torch.Tensor) -> dict:
    with torch.no_grad():
        post.prior.log_precision.copy_(lp0)
    opt = make_hyper_optimizer(method, post.prior, lr=0.1, n_steps=100)
    tic = time.perf_counter()
    value = opt.step(post)
    seconds = time.perf_counter() - tic
    out = {"seconds": seconds, "log_evidence": value, "evaluations": opt.n_evaluations}
    if method == "fixed-point":
        out["trace"] = opt.history  # (evaluations, seconds, evidence) after each iteration
    return out


def reach(trace: list, target: float) -> dict:
    """Evaluations and seconds until the fixed-point iteration first reached ``target``."""
    for evaluations, seconds, value in trace:
        if value >= target:
            return {"evaluations": evaluations, "seconds": seconds}
    return {"evaluations": None, "seconds": None}


def measure(sizes: dict) -> dict:
    torch.set_num_threads(1)
    work = HyperWork(**sizes)
    rows = []
    for prior in PRIORS:
        post = work.posterior(prior)
        lp0 = post.prior.log_precision.detach().clone()
        start = float(post.log_evidence().detach())
        row = {"prior": prior, "n_hyper": lp0.numel(), "start_log_evidence": start}
        for method in HYPER_OPTIMIZERS:
            row[method] = run_method(post, method, lp0)
        row["speedup"] = row["adam"]["seconds"] / row["fixed-point"]["seconds"]
        row["fixed_point_to_reach_adam"] = reach(
            row["fixed-point"]["trace"], row["adam"]["log_evidence"]
        )
        row["evidence_gain_over_adam"] = (
            row["fixed-point"]["log_evidence"] - row["adam"]["log_evidence"]
        )
        rows.append(row)
        print(
            f"{prior:13s} adam {row['adam']['seconds']:8.3f}s {row['adam']['log_evidence']:.6f}"
            f" | fixed-point {row['fixed-point']['seconds']:8.3f}s"
            f" {row['fixed-point']['log_evidence']:.6f}"
            f" ({row['fixed-point']['evaluations']} evaluations; Adam's evidence after"
            f" {row['fixed_point_to_reach_adam']['evaluations']})",
            flush=True,
        )
    # one marglik step per epoch: epoch + refit + hyper update, against the layerwise prior's
    # (from the cold start measured here: later steps start warm and need fewer evaluations)
    per_epoch = work.epoch_s + work.refit_s
    layerwise = next(r for r in rows if r["prior"] == "layerwise")["fixed-point"]["seconds"]
    for row in rows:
        row["epoch_cost_vs_layerwise"] = (per_epoch + row["fixed-point"]["seconds"]) / (
            per_epoch + layerwise
        )
    return {
        "benchmark": "hyperparameter update of one marglik step, Kron exact GGN",
        "model": f"MLP 784-{sizes['width']}-{sizes['width']}-10",
        "n_data": sizes["n"],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "conditions": "one thread on a shared machine with other jobs running: absolute times"
        " vary up to 2-3x between runs; compare rows and anchors of one run only",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "anchors_s": {"train_epoch": work.epoch_s, "curvature_refit": work.refit_s},
        "adam": {"lr": 0.1, "n_steps": 100},
        "rows": rows,
    }


# -- pytest-benchmark ---------------------------------------------------------------------------
_WORK: list[HyperWork] = []


@pytest.fixture
def work(sizes) -> HyperWork:
    if not _WORK:
        torch.set_num_threads(1)
        _WORK.append(HyperWork(**(QUICK if sizes.quick else FULL)))
    return _WORK[0]


@pytest.mark.parametrize("method", HYPER_OPTIMIZERS)
@pytest.mark.parametrize("prior", PRIORS)
def test_hyper_update(benchmark, work, prior, method):
    post = work.posterior(prior)
    lp0 = post.prior.log_precision.detach().clone()
    benchmark.group = f"hyper {prior}"
    result = benchmark.pedantic(run_method, args=(post, method, lp0), rounds=1, iterations=1)
    benchmark.extra_info.update(prior=prior, method=method, threads=torch.get_num_threads())
    benchmark.extra_info.update(result)


def main() -> None:
    args = script_parser(__doc__, "small sizes (a smoke check)").parse_args()
    result = measure(QUICK if args.quick else FULL)
    save_results(result, args.out, "cpu-hyper", args.quick, indent=2)


if __name__ == "__main__":
    main()
