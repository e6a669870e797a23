"""Summarise several ``bench_training.py`` runs of one setting: every target's spread.

    python bench/training_summary.py bench/results/cpu-training-runs/amd-epyc/*.json

On a shared machine one run's ratio is one draw, so a target is judged over the runs: this
prints, per target, its bound, the lowest–highest and median ratio over the runs, how many
runs met it, and — where the runs kept their timed pairs — the median over the runs of
each run's median pair ratio (a case over the plain loop timed right after it), which
other jobs on the machine move less than the best-over-best ratio the target uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import markdown_table  # noqa: E402
from training_plot import check_same_setting  # noqa: E402


def pair_median(run: dict, target: str) -> float | None:
    """The median of one run's per-pair ratios for ``target``; None if it kept no pairs."""
    runs = run.get("runs", {})
    pairs = {**runs.get("cases", {}), **runs.get("relative", {})}.get(target)
    if not pairs:
        return None
    return statistics.median(case / reference for case, reference in pairs)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per target that any run checked, in the order the runs list them."""
    if not runs:
        raise ValueError("no runs to summarise")
    check_same_setting(runs[0], runs[1:])
    names = list(dict.fromkeys(name for run in runs for name in run.get("targets", {})))
    rows = []
    for name in names:
        checked = [run for run in runs if name in run.get("targets", {})]
        ratios = [run["targets"][name]["ratio"] for run in checked]
        pairs = [m for m in (pair_median(run, name) for run in checked) if m is not None]
        rows.append(
            {
                "target": name,
                "bound": checked[0]["targets"][name]["bound"],
                "runs": len(checked),
                "lowest": min(ratios),
                "highest": max(ratios),
                "median": statistics.median(ratios),
                "met": sum(run["targets"][name]["met"] for run in checked),
                "pair_median": statistics.median(pairs) if pairs else None,
                "runs_with_pairs": len(pairs),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["target", "bound", "range", "median", "met", "median pair ratio (runs)"]
    body = [
        [
            f"`{row['target']}`",
            f"≤ {row['bound']:g}",
            f"{row['lowest']:.2f}–{row['highest']:.2f}",
            f"{row['median']:.2f}",
            f"{row['met']} / {row['runs']}",
            "–"
            if row["pair_median"] is None
            else f"{row['pair_median']:.2f} ({row['runs_with_pairs']})",
        ]
        for row in rows
    ]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="bench_training.py JSON files")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    dates = sorted(run["run"]["date"] for run in runs)
    cards = sorted({run["run"]["card"] for run in runs})
    print(f"{len(runs)} runs on {', '.join(cards)}, {dates[0]} to {dates[-1]}\n")
    print(markdown(summarise(runs)))


if __name__ == "__main__":
    main()
