"""SpaM training end to end, side by side, as multiples of a plain PyTorch MAP loop.

    python bench/bench_training.py            # the full table (CPU, 1 thread: about 4 min)
    python bench/bench_training.py --model lenet5   # the same table for LeNet-5 on digits28
    python bench/bench_training.py --quick    # small sizes: checks that every case runs
    python -m pytest bench/bench_training.py [--full]      # the same cases, pytest-benchmark
    python bench/training_ratios.py RESULT.json            # ratios of a pytest-benchmark file
    python bench/training_plot.py bench/results/cpu-training.json [MORE.json ...]  # the plot

Setting (the same for every case): MLP 784-256-256-10, N = 4096 random points, batch 128,
4 epochs, Adam 1e-3 (the plain loop: torch's default Adam; marglik_train: torch's fused
Adam kernel, with the prior as its weight decay — the plain loop on the fused kernel is a
row of its own), no scheduler, Kronecker curvature, a marglik step every epoch (no
burn-in), at most 100 hyperparameter iterations (the default fixed-point update; Adam at
lr 0.1 for the ``_adam`` case), one CPU thread. Cases: the plain loop (denominator);
``marglik_train`` as MAP (burn-in past the end); SpaM with every prior on exact GGN
(refit); layerwise SpaM on EF and MC-GGN, harvested from the epoch and refitted;
the same exact-GGN refit and harvested EF/MC-GGN runs without hyperparameter updates
(``curvature_only_*``: the cost of the training step and the curvature alone);
laplace-torch's ``marglik_training`` (AsdlGGN, AsdlEF; layerwise). ``--model lenet5``
times the same cases for LeNet-5 (conv6-conv16-fc120-fc84, 44 426 parameters) on the
1 437 training images of digits28 (scikit-learn's digits upsampled to 28 × 28), where the
convolutions' Kronecker factors are the curvature's main cost. The script writes the
times, ratios, machine, date, versions, threads and load to ``bench/results/cpu-training.json``
(``cpu-training-lenet5.json``),
plots them beside it (``.png``, see ``training_plot.py``) and prints a Markdown table; for
the harvested cases it also reports how far their final evidence and learned log δ are
from a refit at the final θ.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from conftest import (  # noqa: E402
    in_turn,
    markdown_table,
    run_conditions,
    save_results,
    script_parser,
    time_call,
)
from curvature_baselines import mlp  # noqa: E402
from training_plot import plot_training  # noqa: E402

import spamkern as sk  # noqa: E402
from spamkern.data.batches import TensorBatches  # noqa: E402
from spamkern.data.datasets import load_dataset  # noqa: E402
from spamkern.marglik.hyper import make_hyper_optimizer  # noqa: E402
from spamkern.marglik.training import DEFAULT_HYPER_OPTIMIZER  # noqa: E402
from spamkern.models import lenet5  # noqa: E402
from spamkern.posterior.laplace import LaplacePosterior  # noqa: E402

PRIORS = ("scalar", "layerwise", "unitwise", "parameterwise")
SHORT_CASES = ("plain_loop_fused_adam", "map_marglik_train")  # timed as the best of rounds
# (case, target as a multiple of the plain loop) — the ratios the table is checked against
TARGETS = {
    "map_marglik_train": 1.05,
    "spam_layerwise_ef_epoch": 1.5,
    "spam_layerwise_ggn-mc_epoch": 1.6,
    "spam_layerwise_ggn_refit": 4.0,
}
# (case, reference case, bound): unitwise/parameterwise against layerwise, same curvature
RELATIVE_TARGETS = (
    ("spam_unitwise_ggn_refit", "spam_layerwise_ggn_refit", 2.0),
    ("spam_parameterwise_ggn_refit", "spam_layerwise_ggn_refit", 1.3),
)


MODELS = ("mlp", "lenet5")


@dataclass(frozen=True)
class Setting:
    n: int = 4096
    batch: int = 128
    epochs: int = 4
    hypersteps: int = 100
    lr: float = 1e-3
    width: int = 256
    model: str = "mlp"  # or "lenet5": LeNet-5 on digits28 (``width`` unused)

    @classmethod
    def of(cls, model: str, quick: bool = False) -> Setting:
        """The benchmark's setting for ``model``; ``quick``: small sizes that check it runs."""
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        n = len(load_dataset("digits28").train[1]) if model == "lenet5" else cls.n
        if quick:
            return cls(n=min(n, 512), epochs=2, hypersteps=10, model=model)
        return cls(n=n, model=model)

    @classmethod
    def quick(cls) -> Setting:
        return cls.of("mlp", quick=True)


class Work:
    """One model initialisation and one data set, shared by every case."""

    def __init__(self, setting: Setting, device: torch.device):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.setting, self.device = setting, device
        if setting.model == "lenet5":
            X, y = load_dataset("digits28").train
            self.model = lenet5(tuple(X.shape[1:]), 10).to(device)
            self.X, self.y = X[: setting.n].to(device), y[: setting.n].to(device)
            return
        self.model = mlp(setting.width).to(device)
        self.X = torch.randn(setting.n, 784, generator=gen).to(device)
        self.y = torch.randint(0, 10, (setting.n,), generator=gen).to(device)

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def batches(self, seed: int = 0) -> TensorBatches:
        """The shuffled device batches every case trains on (marglik_train's own order)."""
        gen = torch.Generator().manual_seed(seed)
        return TensorBatches(self.X, self.y, self.setting.batch, shuffle=True, generator=gen)


def plain_loop(work: Work, fused: bool = False):
    """The denominator: a hand-written MAP loop over the same batches (torch's default
    Adam; ``fused``: its fused kernel, which marglik_train uses — a second reference row)."""
    model = work.fresh()
    opt = torch.optim.Adam(model.parameters(), lr=work.setting.lr, fused=fused or None)
    batches = work.batches()
    for _ in range(work.setting.epochs):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def spamkern_run(work: Work, **kwargs):
    s = work.setting
    options = dict(
        n_epochs=s.epochs, lr=s.lr, batch_size=s.batch, n_hypersteps=s.hypersteps,
        structure="kron", scheduler=None, fit_final_posterior=False, progress=False,
    )  # fmt: skip
    options.update(kwargs)
    return sk.marglik_train(work.fresh(), (work.X, work.y), **options)


class _Loader:
    """The same shuffled tensor batches for laplace-torch (which reads ``.dataset``)."""

    def __init__(self, work: Work):
        self.dataset = torch.utils.data.TensorDataset(work.X, work.y)
        self.batches = work.batches()

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def laplace_run(work: Work, backend: str):
    import laplace.curvature
    from laplace.marglik_training import marglik_training

    s = work.setting
    return marglik_training(
        work.fresh(), _Loader(work), likelihood="classification", hessian_structure="kron",
        backend=getattr(laplace.curvature, backend), optimizer_kwargs={"lr": s.lr},
        n_epochs=s.epochs, marglik_frequency=1, n_hypersteps=s.hypersteps,
        prior_structure="layerwise", progress_bar=False,
    )  # fmt: skip


def cases() -> dict[str, Callable[[Work], object]]:
    """Every case of the table, by name."""
    table: dict[str, Callable[[Work], object]] = {
        "plain_loop": plain_loop,
        "plain_loop_fused_adam": partial(plain_loop, fused=True),
        "map_marglik_train": lambda w: spamkern_run(w, n_epochs_burnin=w.setting.epochs + 1),
    }
    for prior in PRIORS:
        table[f"spam_{prior}_ggn_refit"] = lambda w, p=prior: spamkern_run(w, prior=p)
    table["spam_layerwise_ggn_refit_adam"] = lambda w: spamkern_run(w, hyper_optimizer="adam")
    for curvature in ("ef", "ggn-mc"):
        for source in ("epoch", "refit"):
            table[f"spam_layerwise_{curvature}_{source}"] = lambda w, c=curvature, s=source: (
                spamkern_run(w, curvature=c, curvature_source=s)
            )
    # the curvature pipeline alone: the same runs without hyperparameter updates
    for curvature, source in (("ggn", "refit"), ("ef", "epoch"), ("ggn-mc", "epoch")):
        table[f"curvature_only_{curvature}_{source}"] = lambda w, c=curvature, s=source: (
            spamkern_run(w, curvature=c, curvature_source=s, n_hypersteps=0)
        )
    for backend in ("AsdlGGN", "AsdlEF"):
        table[f"laplace_torch_{backend}"] = lambda w, b=backend: laplace_run(w, b)
    return table


def harvest_gap(model, X, y, curvature: str, hypersteps: int, **options) -> dict[str, float]:
    """Train with curvature harvested from the epochs, then at the final θ compare the
    harvested posterior with a refit: evidence at the same δ, and log δ learned from each
    by the default hyperparameter update from the same start."""
    res = sk.marglik_train(
        model, (X, y), curvature=curvature, curvature_source="epoch", n_hypersteps=hypersteps,
        progress=False, **options,
    )  # fmt: skip
    harvested = res.posterior
    refit = sk.fit_laplace(
        res.model, (X, y), curvature=curvature, prior=res.prior, progress=False,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    with torch.no_grad():
        ev_h = float(harvested.log_marginal_likelihood())
        ev_r = float(refit.log_marginal_likelihood())
        fit_h, fit_r = float(harvested.log_likelihood()), float(refit.log_likelihood())
    learned = []
    for posterior in (harvested, refit):
        prior = copy.deepcopy(res.prior)
        fresh = LaplacePosterior(
            res.model, posterior.curvature, prior, "classification", "kron", curvature, 1.0
        )
        make_hyper_optimizer(DEFAULT_HYPER_OPTIMIZER, prior, n_steps=hypersteps).step(fresh)
        learned.append(prior.log_precision.detach())
    diff = (learned[0] - learned[1]).abs()
    return {
        "log_marglik_harvested": ev_h,
        "log_marglik_refit": ev_r,
        "relative_evidence_gap": abs(ev_h - ev_r) / abs(ev_r),
        # the data term: the epoch's running training loss vs the loss at the final θ
        "log_likelihood_harvested": fit_h,
        "log_likelihood_refit": fit_r,
        "max_abs_log_delta_gap": float(diff.max()),
        "mean_abs_log_delta_gap": float(diff.mean()),
    }


def harvest_gaps(work: Work) -> dict[str, dict[str, float]]:
    """The gap on the table's random data (labels memorised: θ moves fast within an epoch)
    and on scikit-learn's 8×8 digits (MLP 64-256-256-10, 20 epochs, learnable labels); for
    LeNet-5, on the table's own run."""
    s = work.setting
    table = dict(n_epochs=s.epochs, lr=s.lr, batch_size=s.batch, scheduler=None)
    out = {}
    for curvature in ("ef", "ggn-mc"):
        out[f"{'random' if s.model == 'mlp' else s.model}_{curvature}"] = harvest_gap(
            work.fresh(), work.X, work.y, curvature, s.hypersteps, **table
        )
    if s.model != "mlp":
        return out
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    for curvature in ("ef", "ggn-mc"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
            torch.nn.ReLU(), torch.nn.Linear(256, 10),
        )  # fmt: skip
        out[f"digits_{curvature}"] = harvest_gap(
            model, X, y, curvature, s.hypersteps, n_epochs=20 if s.epochs > 2 else 2,
            lr=s.lr, batch_size=s.batch, scheduler=None,
        )  # fmt: skip
    return out


def run_table(setting: Setting, rounds: int, repeats: int, only: list[str] | None = None) -> dict:
    """Time every case in one process, each as a multiple of the plain loop timed right
    around it: the machine's load drifts (other jobs), so every case gets its own
    denominator. A case runs ``repeats`` times (``rounds`` for the short MAP cases, as
    short as the plain loop itself), each run followed by a plain loop; its ratio is its
    best run over the best plain loop among those and the one just before — the minimum
    over repeats on both sides, which other jobs on the machine can only push up."""
    device = torch.device("cpu")
    work = Work(setting, device)
    warm = Work(Setting(n=256, epochs=1, hypersteps=2, model=setting.model), device)
    table = cases()
    chosen = [n for n in table if n != "plain_loop" and (not only or n in only)]
    for name in ["plain_loop", *chosen]:
        table[name](warm)  # imports and first calls happen here, not in the timed runs
    plain = partial(time_call, table["plain_loop"], work)
    seconds: dict[str, float] = {}
    ratios: dict[str, float] = {"plain_loop": 1.0}
    runs: dict[str, list[tuple[float, float]]] = {}
    before = plain()
    plains = [before]
    for name in chosen:
        count = rounds if name in SHORT_CASES else repeats
        pairs = [(time_call(table[name], work), plain()) for _ in range(count)]
        plains += [p for _, p in pairs]
        best = min(t for t, _ in pairs)
        denominator = min([before] + [p for _, p in pairs])
        seconds[name] = best
        ratios[name] = best / denominator
        runs[name] = pairs
        spread = _spread([t / p for t, p in pairs])
        print(f"{name:34s} {best:8.2f} s  {ratios[name]:6.2f}x  (runs {spread})", flush=True)
        before = pairs[-1][1]
    seconds["plain_loop"] = min(plains)
    # a case and its reference in turn: a quotient of two ratios each over its own plain
    # loop carries both loops' noise (one table put the parameterwise run at 1.25× the
    # layerwise one while their own times, measured in the same table, gave 1.42×)
    relative_runs = {
        f"{case}/{ref}": in_turn(partial(table[case], work), partial(table[ref], work), repeats)
        for case, ref, _ in RELATIVE_TARGETS
        if case in chosen and ref in chosen
    }
    relative = {
        name: min(c for c, _ in pairs) / min(r for _, r in pairs)
        for name, pairs in relative_runs.items()
    }
    gaps = {} if only else harvest_gaps(work)
    return {
        "run": run_conditions(),  # card, versions, threads, date, load per core
        "load_average_1_5_15": list(os.getloadavg()),  # other work on the machine meanwhile
        "setting": setting.__dict__,
        "timing": {  # how every ratio was formed (see run_table)
            "repeats": repeats,
            "rounds_short_cases": rounds,
            "ratio": "best run of the case / best plain loop run around it",
            "relative": "best run of the case / best run of the reference, interleaved",
            "pair_median": "per target, the median over its runs of (case / the run timed "
            "right after it): less moved by other jobs than the best-over-best ratio",
            "runs": "every run in seconds, in the order timed: [case, plain loop after it], "
            "and for the relative targets [case, reference] — the spread within this run",
        },
        "seconds": seconds,
        "runs": {"cases": runs, "relative": relative_runs},
        "ratios": ratios,
        "relative": relative,
        "targets": _with_pair_medians(_targets(ratios, relative), {**runs, **relative_runs}),
        # the training step alone, both on torch's fused Adam kernel
        "map_vs_fused_plain_loop": (
            ratios["map_marglik_train"] / ratios["plain_loop_fused_adam"]
            if {"map_marglik_train", "plain_loop_fused_adam"} <= ratios.keys()
            else None
        ),
        "harvest_vs_refit": gaps,
    }


def _spread(ratios: list[float]) -> str:
    """Lowest–highest of one case's per-run ratios (each run over the one timed after it): how far
    this machine's noise moves a single draw."""
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def _targets(ratios: dict[str, float], relative: dict[str, float] | None = None) -> dict:
    """Every target met or missed; a relative one from ``relative`` where it was timed
    (interleaved), else as the quotient of the two cases' ratios."""
    out = {}
    for case, bound in TARGETS.items():
        if case in ratios:
            out[case] = {"ratio": ratios[case], "bound": bound, "met": ratios[case] <= bound}
    for case, ref, bound in RELATIVE_TARGETS:
        name = f"{case}/{ref}"
        rel = (relative or {}).get(name)
        if rel is None and case in ratios and ref in ratios:
            rel = ratios[case] / ratios[ref]
        if rel is not None:
            out[name] = {"ratio": rel, "bound": bound, "met": rel <= bound}
    return out


def _with_pair_medians(targets: dict, pairs: dict[str, list[tuple[float, float]]]) -> dict:
    """Each target with the median of its per-pair ratios beside the ratio it is judged by."""
    for name, target in targets.items():
        target["pair_median"] = statistics.median(a / b for a, b in pairs[name])
    return targets


def markdown(result: dict) -> str:
    rows = [[f"`{case}`", f"{ratio:.2f}"] for case, ratio in result["ratios"].items()]
    return markdown_table(["run", "× plain loop"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, "small sizes (a check, not numbers)", repeats=5)
    parser.add_argument("--rounds", type=int, default=5, help="best of this many for short runs")
    parser.add_argument("--only", nargs="*", help="cases to time (besides the plain loop)")
    parser.add_argument("--model", choices=MODELS, default="mlp", help="the network timed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setting = Setting.of(args.model, quick=args.quick)
    result = run_table(setting, args.rounds, args.repeats, args.only)
    print(markdown(result))
    for name, target in result["targets"].items():
        verdict = "met" if target["met"] else "missed"
        pairs = {**result["runs"]["cases"], **result["runs"]["relative"]}[name]
        spread = _spread([a / b for a, b in pairs])
        print(
            f"target {name}: {target['ratio']:.2f} ≤ {target['bound']} {verdict} (runs {spread}, "
            f"median pair {target['pair_median']:.2f})"
        )
    print(json.dumps(result["harvest_vs_refit"], indent=1))
    stem = "cpu-training" + ("" if args.model == "mlp" else f"-{args.model}")
    save_results(result, args.out, stem, args.quick, plot_training)


# ---------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # the script runs without pytest
    pytest = None

if pytest is not None:
    # the MLP only: a GPU benchmark phase gives each file 75 s, and a timed-out pytest
    # process keeps none of its results (LeNet-5's table: ``--model lenet5``)
    @pytest.fixture(scope="module")
    def work(sizes, device) -> Work:
        return Work(Setting.of("mlp", quick=sizes.quick), device)

    @pytest.mark.parametrize("case", list(cases()))
    def test_training(benchmark, timed, work, case):
        if case.startswith("laplace_torch"):
            pytest.importorskip("laplace")  # laplace-torch is an optional reference
        model = work.setting.model
        benchmark.group = f"training {model}"
        benchmark.extra_info.update(model=model, case=case, epochs=work.setting.epochs)
        fn = cases()[case]
        timed(lambda: fn(work), rounds=2 if case in ("plain_loop", *SHORT_CASES) else 1)


if __name__ == "__main__":
    main()
