"""Ablation of one-shot pruning: score × reconstruction × prior × scope, no fine-tuning.

    python scripts/ablation.py                  # writes docs/results/ablation.{csv,md,png}
    python scripts/ablation.py --seeds 0 --data digits28 --out /tmp/abl

For each data set (digits28 with LeNet-5, digits with the small CNN, breast cancer with
CancerNet) and seed, a MAP model (scalar prior fixed at 1) and a SpaM model (unitwise prior
learned by the marginal likelihood, KFAC exact GGN) are trained once from one
initialisation with the main job's schedules. Each is then pruned through the same
``sk.sparsify`` pipeline with every

* score: ``opd`` ½θ²Π_ii, ``obs`` ½θ²/[Π⁻¹]_ii, ``prior`` ½δθ², ``kron`` (Kronecker cost
  with its cross terms, grown in rounds), ``magnitude`` |θ|;
* reconstruction: ``none``, ``posterior`` (survivors re-solved from the posterior's A,
  data-free), ``data`` (re-solved layer by layer on the pruned network's training inputs);
* scope: ``global`` (one threshold) and ``layerwise`` (the same fraction in every layer);

at 80/90/95 % of the weights (unstructured) and 40/60 % of the units (unit pruning,
compressed), and evaluated on the test split (accuracy, MAP predictive).
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from spamkern.experiment.report import write_csv
from spamkern.experiment.sweep import LENET5_LEVELS, accuracy_by_level, method_grid, sweep

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("digits28", "digits", "breast_cancer")
SCORES = ("opd", "obs", "prior", "kron", "magnitude")
RECONSTRUCTIONS = ("none", "posterior", "data")
SCOPES = ("global", "layerwise")
MODELS = {"spam": "SpaM", "map": "MAP"}
LEVELS = [(p, lv) for p, lvs in LENET5_LEVELS.items() for lv in lvs]
SHORT = {"unstructured": "w", "unit": "u"}


def _cell(acc: dict, ds: str, pattern: str, label: str, scope: str, level: float) -> str:
    v = acc.get((ds, pattern, label, scope, level))
    return "–" if v is None else f"{v[0]:.1f}"


def table(acc: dict, ds: str, scope: str, n_seeds: int) -> list[str]:
    """Score × reconstruction down, level across; each cell "SpaM / MAP"."""
    dense = {m: acc.get((ds, "dense", m, "", 0.0)) for m in MODELS.values()}
    dense_txt = ", ".join(f"{m} {v[0]:.1f}" for m, v in dense.items() if v is not None)
    head = [f"{SHORT[p]}{lv:g}%" for p, lv in LEVELS]
    lines = [
        f"\n**{ds}, {scope} scope** — test accuracy (%), SpaM / MAP, mean over {n_seeds} "
        f"seed(s); w = weights removed (unstructured), u = units removed; dense {dense_txt}\n",
        "| score | reconstruction | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(head),
    ]
    for score in SCORES:
        for rec in RECONSTRUCTIONS:
            cells = []
            for pattern, lv in LEVELS:
                spam = _cell(acc, ds, pattern, f"SpaM+{score}+{rec}", scope, lv)
                mapv = _cell(acc, ds, pattern, f"MAP+{score}+{rec}", scope, lv)
                cells.append(f"{spam} / {mapv}")
            lines.append(f"| {score} | {rec} | " + " | ".join(cells) + " |")
    return lines


def prior_effect(rows: list[dict]) -> list[str]:
    """SpaM − MAP (points), paired by seed, score, scope and level, per reconstruction."""
    per = {}
    for r in rows:
        if r["pattern"] in LENET5_LEVELS and r["predictive"] == "map":
            key = (r["dataset"], r["seed"], r["score"], r["reconstruct"], r["scope"], r["pattern"])
            per[(*key, float(r["sparsity"]), r["model"])] = 100 * float(r["accuracy"])
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = [
        "\n**Where the SpaM prior adds value** — SpaM minus MAP accuracy (points), mean over "
        "scores, scopes, levels and seeds; in brackets the paired comparisons SpaM won-lost\n",
        "| reconstruction | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for rec in RECONSTRUCTIONS:
        cells = []
        for ds in datasets:
            diffs = [
                v - per[(*k[:-1], "map")]
                for k, v in per.items()
                if k[-1] == "spam" and k[0] == ds and k[3] == rec and (*k[:-1], "map") in per
            ]
            if not diffs:
                cells.append("–")
                continue
            won, lost = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            cells.append(f"{sum(diffs) / len(diffs):+.1f} ({won}-{lost})")
        lines.append(f"| {rec} | " + " | ".join(cells) + " |")
    return lines


def best_table(acc: dict, datasets: list[str]) -> list[str]:
    """The best method (global scope) per data set and level, with its accuracy."""
    lines = [
        "\n**Best combination per level** (global scope, mean over seeds)\n",
        "| data set | " + " | ".join(f"{SHORT[p]}{lv:g}%" for p, lv in LEVELS) + " |",
        "|---|" + "---|" * len(LEVELS),
    ]
    for ds in datasets:
        cells = []
        for pattern, lv in LEVELS:
            cands = [
                (v[0], label)
                for (d, p, label, scope, level), v in acc.items()
                if (d, p, scope, level) == (ds, pattern, "global", lv)
            ]
            if cands:
                best = max(cands)
                cells.append(f"{best[1]} {best[0]:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], header: str) -> str:
    acc = accuracy_by_level(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    n_seeds = len({r["seed"] for r in rows})
    lines = [header, *prior_effect(rows), *best_table(acc, datasets)]
    for ds in datasets:
        for scope in SCOPES:
            lines.extend(table(acc, ds, scope, n_seeds))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Heat map per data set (global scope): score × reconstruction down, prior × level across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = accuracy_by_level(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    ylabels = [f"{s}+{r}" for s in SCORES for r in RECONSTRUCTIONS]
    xlabels = [f"{m} {SHORT[p]}{lv:g}" for m in MODELS.values() for p, lv in LEVELS]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 6.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        grid = torch.full((len(ylabels), len(xlabels)), float("nan"))
        for i, (s, r) in enumerate((s, r) for s in SCORES for r in RECONSTRUCTIONS):
            for j, (m, (p, lv)) in enumerate((m, pl) for m in MODELS.values() for pl in LEVELS):
                v = acc.get((ds, p, f"{m}+{s}+{r}", "global", lv))
                if v is not None:
                    grid[i, j] = v[0]
        im = ax.imshow(grid.numpy(), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not torch.isnan(grid[i, j]):
                    v = float(grid[i, j])
                    color = "white" if v < 60 else "black"
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, fontsize=7)
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
        ax.set_title(f"{ds} — test accuracy (%), global scope", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", nargs="+", choices=DATASETS, default=list(DATASETS), help="data sets (all three)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (0 1)")
    p.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "results", help="output folder (docs/results)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="override every data set's training epochs"
    )
    p.add_argument(
        "--from-csv",
        type=Path,
        default=None,
        metavar="CSV",
        help="re-render ablation.md and ablation.png from an earlier ablation.csv (no training)",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_csv is not None:
        with open(args.from_csv) as fh:
            rows = list(csv.DictReader(fh))
        header = (args.out / "ablation.md").read_text().split("\n\n**")[0]
        (args.out / "ablation.md").write_text(markdown(rows, header))
        plot(rows, args.out / "ablation.png")
        return 0
    torch.set_num_threads(1)
    started = datetime.now(UTC)
    methods = method_grid(("spam", "map"), SCORES, RECONSTRUCTIONS)
    levels = {pattern: lvs for pattern, lvs in LENET5_LEVELS.items()}
    rows = sweep(
        args.data,
        args.seeds,
        [(methods, levels)],
        scopes=SCOPES,
        epochs=args.epochs,
        log=lambda m: print(m, file=sys.stderr),
    )
    seconds = (datetime.now(UTC) - started).total_seconds()
    header = (
        f"# Ablation: score × reconstruction × prior × scope\n\n"
        f"`python scripts/ablation.py` — {', '.join(args.data)}; seeds "
        f"{' '.join(map(str, args.seeds))}; no fine-tuning; {started:%Y-%m-%d %H:%M} UTC, "
        f"{seconds / 60:.1f} min on 1 torch thread (torch {torch.__version__})."
    )
    write_csv(rows, args.out / "ablation.csv")
    (args.out / "ablation.md").write_text(markdown(rows, header))
    plot(rows, args.out / "ablation.png")
    print(markdown(rows, header))
    print(f"wrote {args.out / 'ablation.csv'}, ablation.md, ablation.png ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
