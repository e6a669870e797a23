"""Accuracy-vs-sparsity sweeps over a grid of methods, and the pruning-quality targets.

The engine of the pruning-quality benchmark (``bench/bench_pruning_quality.py``) and of
the ablation (``scripts/ablation.py``). Each (data set, seed) trains its MAP and SpaM
models once with the main job's schedule (:func:`~spamkern.experiment.run.prepare_run`);
every method × scope × pattern × level then prunes one of them through the main job's own
pipeline (:func:`~spamkern.experiment.run.pruned_rows`), without fine-tuning, so SpaM and
MAP differ only in the trained model and its posterior.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from spamkern.experiment.config import RECONSTRUCTIONS, Method
from spamkern.experiment.run import dense_rows, prepare_run, pruned_rows

# (methods: label → method, levels: pattern → sparsity percentages) pairs
Plan = list[tuple[dict[str, Method], dict[str, Sequence[float]]]]


def method_label(method: Method) -> str:
    """``SpaM+obs+data``-style label: model, score, reconstruction."""
    model = "SpaM" if method.model == "spam" else "MAP"
    return f"{model}+{method.score}+{method.reconstruct}"


def method_grid(
    models: Iterable[str] = ("spam", "map"),
    scores: Iterable[str] = ("opd", "obs", "prior", "kron", "magnitude"),
    reconstructions: Iterable[str] = RECONSTRUCTIONS,
) -> dict[str, Method]:
    """Every model × score × reconstruction, labelled by :func:`method_label`."""
    grid = [Method(m, s, r) for m in models for s in scores for r in reconstructions]
    return {method_label(m): m for m in grid}


def job_args(epochs: int | None = None, threads: int = 1):
    """The main job's options (its parser's defaults) for a sweep: no progress bars, one
    timed forward pass per compressed model, ``epochs`` overriding every schedule."""
    from spamkern.cli import build_parser

    argv = ["--no-progress", "--latency-repeats", "1", "--threads", str(threads)]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    return build_parser().parse_args(argv)


def sweep(
    datasets: Sequence[str],
    seeds: Sequence[int],
    plan: Plan,
    scopes: Sequence[str] = ("global",),
    epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Rows (the main job's CSV fields) of every (data set, seed) × plan entry × scope.

    ``plan`` lists (methods, levels) pairs, levels being pattern → sparsity percentages,
    so a few methods can run at many levels and a larger grid at a few.
    """
    args = job_args(epochs)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows: list[dict] = []
    for name in datasets:
        for seed in seeds:
            tic = time.perf_counter()
            run = prepare_run(name, None, seed, args, device)
            trained_s = time.perf_counter() - tic
            rows.extend(dense_rows(run))
            for scope in scopes:
                for methods, levels in plan:
                    for pattern, pcts in levels.items():
                        args.scope, args.patterns, args.sparsities = scope, [pattern], list(pcts)
                        rows.extend(pruned_rows(run, methods))
            pruned_s = time.perf_counter() - tic - trained_s
            log(f"{name} seed {seed}: trained in {trained_s:.0f} s, pruned in {pruned_s:.0f} s")
    return rows


# ---------------------------------------------------------------------------- summaries
def accuracy_by_level(rows: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(data set, pattern, method, scope, level) → (mean, sample std, seeds) of the test
    accuracy in %, MAP predictive; the dense models under pattern "dense", level 0."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["predictive"] != "map":
            continue
        key = (r["dataset"], r["pattern"], r["method"], r["scope"], float(r["sparsity"]))
        groups.setdefault(key, []).append(100.0 * float(r["accuracy"]))
    out = {}
    for key, values in groups.items():
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[key] = (m, math.sqrt(var), len(values))
    return out


# The library's best call and the baselines the targets compare it with (labels of the grid).
OURS = "SpaM+default+data"
BASELINE = "MAP+magnitude+none"
SAME_ON_MAP = "MAP+default+data"
LENET5_LEVELS = {"unstructured": (80.0, 90.0, 95.0), "unit": (40.0, 60.0)}
# unstructured level (or unit level) → how far below dense the library's best may fall
DENSE_GAP = {("unstructured", 90.0): 5.0, ("unstructured", 95.0): 15.0, ("unit", 60.0): 15.0}


def _test_sizes(rows: list[dict]) -> dict[str, int]:
    """Test-set size per data set (one test point = 100 / n accuracy points)."""
    from spamkern.data import load_dataset

    return {ds: len(load_dataset(ds).test[1]) for ds in dict.fromkeys(r["dataset"] for r in rows)}


def quality_targets(rows: list[dict], lenet5_set: str = "digits28") -> list[dict]:
    """Each pruning-quality target checked on the mean over seeds (global scope).

    On ``lenet5_set``: ``OURS`` ≥ ``BASELINE`` + 5 points at 80/90/95 % unstructured and
    40/60 % units; within 5 points of the dense SpaM model at 90 %, 15 at 95 % and at 60 %
    units; never more than 2 points below ``SAME_ON_MAP``. On every other data set: never
    more than one test point below ``BASELINE`` at any level. Returns one dict per check
    (what, level, ours, reference, margin, passed); missing methods are skipped.
    """
    acc = accuracy_by_level([r for r in rows if r["scope"] in ("global", "")])
    checks = []

    def get(ds, pattern, method, level):
        return acc.get((ds, pattern, method, "global" if pattern != "dense" else "", level))

    def add(what, ds, pattern, level, ours, ref, margin):
        checks.append(
            {
                "check": what,
                "dataset": ds,
                "pattern": pattern,
                "sparsity": level,
                "ours": round(ours, 2),
                "reference": round(ref, 2),
                "required_margin": round(margin, 2),
                "passed": ours - ref >= margin,
            }
        )

    datasets = dict.fromkeys(r["dataset"] for r in rows)
    if lenet5_set in datasets:
        dense = get(lenet5_set, "dense", "SpaM", 0.0)
        for pattern, levels in LENET5_LEVELS.items():
            for level in levels:
                ours = get(lenet5_set, pattern, OURS, level)
                if ours is None:
                    continue
                cell = (lenet5_set, pattern)
                references = [
                    (f"{OURS} ≥ {BASELINE} + 5", get(*cell, BASELINE, level), 5.0),
                    (f"{OURS} ≥ {SAME_ON_MAP} − 2", get(*cell, SAME_ON_MAP, level), -2.0),
                ]
                gap = DENSE_GAP.get((pattern, level))
                if gap is not None:
                    references.append((f"{OURS} ≥ dense SpaM − {gap:g}", dense, -gap))
                for what, ref, margin in references:
                    if ref is not None:
                        add(what, *cell, level, ours[0], ref[0], margin)
    sizes = _test_sizes(rows)
    for ds in datasets:
        if ds == lenet5_set:
            continue
        point = 100.0 / sizes[ds]
        for (d, pattern, method, _, level), (ours, _, _) in sorted(acc.items()):
            if d != ds or method != OURS:
                continue
            base = get(ds, pattern, BASELINE, level)
            if base is not None:
                add(
                    f"{OURS} ≥ {BASELINE} − 1 test point", ds, pattern, level, ours, base[0], -point
                )
    return checks
