"""The reports on the runner's rows: markdown tables, the verdict, the CSV and the plot.

Only the rows are read (columns of :data:`~spamkern.experiment.config.CSV_FIELDS`), so a
``results.csv`` from an earlier or interrupted run can be reported on again.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Callable
from pathlib import Path

from spamkern.experiment.config import CSV_FIELDS, METHODS, PATTERNS

VERDICT_ORDER = ("better", "mixed", "worse", "both at chance level")
# The lowest level each pattern's verdict looks at: high sparsity for single weights; for
# units already 40 %, where the small networks start to lose accuracy.
VERDICT_FROM = {"unstructured": 80.0, "unit": 40.0}
# (ours, theirs) pairs with a verdict in the summary, when both were run.
VERDICT_PAIRS = (
    ("SpaM+OPD", "MAP+magnitude"),
    ("SpaM+sparsify", "MAP+magnitude"),
    ("SpaM+sparsify", "MAP+magnitude+rec"),
    ("SpaM+sparsify", "MAP+sparsify"),
)
# Drawn bold in the plot: the paper's pair and the library's best against its fair baselines.
HEADLINE = ("SpaM+OPD", "MAP+magnitude", "SpaM+sparsify", "MAP+sparsify", "MAP+magnitude+rec")


# ---------------------------------------------------------------------------- aggregation
def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _group(rows: list[dict], key: Callable[[dict], tuple], field_name: str) -> dict:
    """(mean, std) of ``field_name`` per ``key``, skipping rows that leave it empty."""
    out: dict[tuple, list[float]] = {}
    for r in rows:
        if r[field_name] == "":
            continue
        out.setdefault(key(r), []).append(float(r[field_name]))
    return {k: _mean_std(v) for k, v in out.items()}


def _accuracy_by_level(rows: list[dict]) -> dict:
    """Mean accuracy per (data set, pattern, method, sparsity), shared by tables and plot."""
    return _group(
        rows, lambda r: (r["dataset"], r["pattern"], r["method"], float(r["sparsity"])), "accuracy"
    )


# ---------------------------------------------------------------------------- tables
def _accuracy_table(
    rows: list[dict], acc: dict, ds: str, pattern: str, dense: dict, n_seeds: int
) -> list[str]:
    """One data set × pattern: a caption line, then methods down, sparsity levels across."""
    levels = sorted({float(r["sparsity"]) for r in rows if r["pattern"] == pattern})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["pattern"] == pattern))
    lines = [
        f"\n**{ds}, {pattern} pruning** — test accuracy (%), mean over {n_seeds} "
        f"seed(s); dense MAP {100 * dense.get('MAP', float('nan')):.1f}, dense SpaM "
        f"{100 * dense.get('SpaM', float('nan')):.1f}\n",
        "| method | " + " | ".join(f"{s:g}%" for s in levels) + " |",
        "|---" * (len(levels) + 1) + "|",
    ]
    for m in methods:
        cells = []
        for s in levels:
            if (ds, pattern, m, s) not in acc:
                cells.append("–")
                continue
            mean, std = acc[(ds, pattern, m, s)]
            cells.append(f"{100 * mean:.1f}" + (f"±{100 * std:.1f}" if n_seeds > 1 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def accuracy_tables(rows: list[dict]) -> str:
    """Markdown: mean test accuracy (%) per method × sparsity, per data set and pattern.

    Every number here is under the MAP predictive (the GLM rows go to :func:`dense_table`).
    """
    rows = [r for r in rows if r["predictive"] == "map"]
    acc = _accuracy_by_level(rows)
    n_seeds = len({r["seed"] for r in rows})
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        dense = {
            m: acc[(ds, "dense", m, 0.0)][0]
            for m in ("MAP", "SpaM")
            if (ds, "dense", m, 0.0) in acc
        }
        for pattern in [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]:
            lines.extend(_accuracy_table(rows, acc, ds, pattern, dense, n_seeds))
    return "\n".join(lines)


def dense_table(rows: list[dict]) -> str:
    """Markdown: the unpruned models under the MAP and the Laplace (GLM probit) predictive."""
    keys = ("accuracy", "nll", "ece", "brier")
    stats = {
        k: _group(rows, lambda r: (r["dataset"], r["method"], r["predictive"]), k) for k in keys
    }
    lines = [
        "\n**Unpruned models** — MAP predictive vs Laplace GLM predictive (probit)\n",
        "| data set | model | predictive | accuracy % | NLL | ECE | Brier |",
        "|---|---|---|---|---|---|---|",
    ]
    for (ds, method, pred), (acc, _) in stats["accuracy"].items():
        if method not in ("MAP", "SpaM"):
            continue
        nll, ece, brier = (stats[k][(ds, method, pred)][0] for k in ("nll", "ece", "brier"))
        lines.append(
            f"| {ds} | {method} | {pred} | {100 * acc:.1f} | {nll:.3f} | {ece:.3f} | {brier:.3f} |"
        )
    return "\n".join(lines)


def compression_table(rows: list[dict]) -> str:
    """Markdown: compressed size and latency of the structured SpaM models (the library's
    ``sparsify`` when it was run, else SpaM+OPD)."""
    ran = {r["method"] for r in rows if r["pattern"] == "unit"}
    method = "SpaM+sparsify" if "SpaM+sparsify" in ran else "SpaM+OPD"
    sel = [r for r in rows if r["pattern"] == "unit" and r["method"] == method]
    if not sel:
        return ""
    dense = [r for r in rows if r["method"] == "SpaM" and r["predictive"] == "map"]
    lines = [
        f"\n**Structured {method}, compressed** — parameters, FLOPs per sample, CPU latency "
        "(batch 256, 1 thread, median), mean over seeds\n",
        "| data set | units removed | params | FLOPs | latency ms | accuracy % |",
        "|---|---|---|---|---|---|",
    ]
    keys = ("params", "flops", "latency_ms", "accuracy")
    for ds in dict.fromkeys(r["dataset"] for r in sel):
        groups = [(0.0, [r for r in dense if r["dataset"] == ds])]
        for s in sorted({float(r["sparsity"]) for r in sel if r["dataset"] == ds}):
            groups.append((s, [r for r in sel if r["dataset"] == ds and float(r["sparsity"]) == s]))
        for s, rs in groups:
            avg = {k: sum(float(r[k]) for r in rs) / len(rs) for k in keys}
            lines.append(
                f"| {ds} | {s:g}% | {avg['params']:.0f} | {avg['flops']:.0f} | "
                f"{avg['latency_ms']:.3f} | {100 * avg['accuracy']:.1f} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- verdict
def _verdict_kind(pairs: list[tuple[float, float]], diffs: list[float], chance: float) -> str:
    """Classify one level from its seed-paired accuracies (see :func:`verdict`)."""
    mean_diff = sum(diffs) / len(diffs)
    top = max(max(sum(a for a, _ in pairs), sum(b for _, b in pairs)) / len(pairs), 0)
    if top <= chance + 0.05:
        return "both at chance level"
    if all(d >= 0 for d in diffs) and mean_diff >= 1.0:
        return "better"
    if all(d <= 0 for d in diffs) and mean_diff <= -1.0:
        return "worse"
    return "mixed"


def _won_tied_lost(diffs: list[float]) -> str:
    """Seeds where ours was higher, equal, lower, as ``W-T-L``."""
    return "-".join(
        str(sum(1 for d in diffs if test(d)))
        for test in (lambda d: d > 0, lambda d: d == 0, lambda d: d < 0)
    )


def verdict(rows: list[dict], ours: str = "SpaM+OPD", theirs: str = "MAP+magnitude") -> str:
    """Plain statement, per data set and pattern, of where ``ours`` beats ``theirs`` at high
    sparsity (from :data:`VERDICT_FROM`: 80 % of the weights, 40 % of the units, up to 99 %).

    Seeds pair the two (same split, same initialisation). "Better" means not lower on any
    seed and at least 1 point higher on average ("worse" likewise); anything else is
    "mixed". Levels where both stay within 5 points of the majority-class rate are "both
    at chance level" (no winner there). Each level shows the mean difference and the
    seeds won-tied-lost.
    """
    per_seed: dict[tuple, float] = {}
    for r in rows:
        if r["pattern"] in PATTERNS:
            key = (r["dataset"], r["pattern"], r["method"], float(r["sparsity"]), r["seed"])
            per_seed[key] = float(r["accuracy"])
    chance = {r["dataset"]: float(r["chance"]) for r in rows if r["chance"] != ""}
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    lines = [
        f"\n**{ours} vs {theirs}** at 80–99 % of the weights and 40–99 % of the units "
        f"(mean accuracy difference in points "
        f"over {len(seeds)} paired seed(s); seeds won-tied-lost)\n"
    ]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for pattern in PATTERNS:
            levels = sorted(
                {
                    k[3]
                    for k in per_seed
                    if k[:3] == (ds, pattern, ours)
                    and VERDICT_FROM[pattern] <= k[3] <= 99
                    and (ds, pattern, theirs, k[3], k[4]) in per_seed
                }
            )
            if not levels:
                continue
            verdicts: dict[str, list[str]] = {}
            for s in levels:
                pairs = [
                    (per_seed[(ds, pattern, ours, s, sd)], per_seed[(ds, pattern, theirs, s, sd)])
                    for sd in seeds
                    if (ds, pattern, ours, s, sd) in per_seed
                    and (ds, pattern, theirs, s, sd) in per_seed
                ]
                diffs = [100 * (a - b) for a, b in pairs]
                kind = _verdict_kind(pairs, diffs, chance.get(ds, 0.0))
                mean_diff = sum(diffs) / len(diffs)
                verdicts.setdefault(kind, []).append(
                    f"{s:g}% ({mean_diff:+.1f}, {_won_tied_lost(diffs)})"
                )
            parts = [f"{k} at {', '.join(verdicts[k])}" for k in VERDICT_ORDER if k in verdicts]
            lines.append(f"- {ds}, {pattern}: " + "; ".join(parts))
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """:func:`verdict` for each pair of :data:`VERDICT_PAIRS` whose two methods were run."""
    ran = {r["method"] for r in rows}
    return [verdict(rows, a, b) for a, b in VERDICT_PAIRS if {a, b} <= ran]


# ---------------------------------------------------------------------------- outputs
def summary(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    """``summary.md``: a header line with the run's settings, then every table."""
    header = (
        f"# spamkern main job — {', '.join(n for n, _ in args.data)}; seeds "
        f"{' '.join(map(str, args.seeds))}; prior {args.prior}, structure {args.structure}; "
        f"{args.scope} scope; fine-tune epochs {args.finetune_epochs}; {seconds:.0f} s on "
        f"{args.threads} thread(s)"
    )
    return "\n".join(
        [
            header,
            accuracy_tables(rows),
            dense_table(rows),
            compression_table(rows),
            *verdicts(rows),
            "",
        ]
    )


def write_csv(rows: list[dict], path: Path) -> None:
    """All rows, floats to 6 significant digits so reruns diff cleanly."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _plot_panel(ax, acc: dict, ds: str, pattern: str) -> None:
    """One data set × pattern; the :data:`HEADLINE` methods drawn bold."""
    ran = dict.fromkeys(m for (d, p, m, _) in acc if (d, p) == (ds, pattern))
    for method in [m for m in METHODS if m in ran] + [m for m in ran if m not in METHODS]:
        pts = sorted(
            (s, v) for (d, p, m, s), v in acc.items() if (d, p, m) == (ds, pattern, method)
        )
        if not pts:
            continue
        xs = [s for s, _ in pts]
        ys = [100 * v[0] for _, v in pts]
        bold = method in HEADLINE
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            lw=2.4 if bold else 1.0,
            label=method,
            alpha=1.0 if bold else 0.75,
        )
    ax.set_title(f"{ds} — {pattern}")
    ax.set_xlabel("sparsity (%)" if pattern == "unstructured" else "units removed (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs sparsity, one panel per data set × pattern, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    patterns = [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]
    acc = _accuracy_by_level(rows)
    fig, axes = plt.subplots(
        len(datasets),
        len(patterns),
        figsize=(5.5 * len(patterns), 3.8 * len(datasets)),
        squeeze=False,
    )
    for i, ds in enumerate(datasets):
        for j, pattern in enumerate(patterns):
            _plot_panel(axes[i][j], acc, ds, pattern)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
