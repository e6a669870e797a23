"""Plot ``bench_training.py`` results: every case as a multiple of the plain loop, with targets.

    python bench/training_plot.py bench/results/cpu-training.json   # writes the .png beside it
    python bench/training_plot.py HEADLINE.json MORE.json ... --out PLOT.png

``bench_training.py`` calls :func:`plot_training` after every full run. Left panel: each
case's best run over the plain loop timed around it (log scale), the cases with a target
green where met and red where missed, the target itself a black tick; laplace-torch's
loops, the reference, in orange. Right panel: the unitwise and parameterwise runs over the
layerwise one, timed in turn, against their bounds. Given more runs of the same setting,
the bars stay the first (headline) run's and a whisker spans every run's ratio, with how
many of the runs met each target: on a shared machine one run's ratio is one draw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MET, MISSED, REFERENCE, OTHER = "#2a9d55", "#d1495b", "#e08a2c", "#9aa5b1"


def bar_colours(result: dict, names: list[str]) -> list[str]:
    """One colour per case: met / missed where the run has a target, else reference or other."""
    targets = result.get("targets", {})
    colours = []
    for name in names:
        if name in targets:
            colours.append(MET if targets[name]["met"] else MISSED)
        elif name.startswith("laplace_torch"):
            colours.append(REFERENCE)
        else:
            colours.append(OTHER)
    return colours


def _setting(run: dict) -> dict | None:
    """A run's setting; runs written before the network was recorded timed the MLP."""
    setting = run.get("setting")
    return None if setting is None else {"model": "mlp"} | setting


def check_same_setting(result: dict, others: list[dict]) -> None:
    """Refuse runs of another setting (network, N, epochs...): their ratios do not compare."""
    for index, other in enumerate(others, start=1):
        if _setting(other) != _setting(result):
            raise ValueError(
                f"run {index} of the extra runs has setting {other.get('setting')}, the "
                f"headline run {result.get('setting')}: only runs of one setting compare"
            )


def _label(name: str, value: float, runs: list[dict]) -> str:
    """'1.48×', with 'met k/n' over ``runs`` when there are several and the case has a target."""
    verdicts = [run["targets"][name]["met"] for run in runs if name in run.get("targets", {})]
    if len(runs) < 2 or not verdicts:
        return f"{value:.2f}×"
    return f"{value:.2f}× (met {sum(verdicts)}/{len(verdicts)})"


def _panel(ax, result: dict, key: str, labels: list[str], runs: list[dict]) -> None:
    """Bars of ``result[key]``, targets, and the range over ``runs`` (all runs, headline first)."""
    values = result[key]
    names = list(values)
    y = list(range(len(names)))[::-1]  # the table's order, top to bottom
    ax.barh(y, [values[n] for n in names], color=bar_colours(result, names), height=0.7)
    for yi, name in zip(y, names):
        seen = [run[key][name] for run in runs if name in run.get(key, {})]
        end = max(seen)
        if min(seen) < end:
            ax.hlines(yi, min(seen), end, color="black", lw=0.9, gid="range")
        target = result.get("targets", {}).get(name)
        if target is not None:
            bound = [target["bound"]] * 2
            ax.plot(bound, [yi - 0.45, yi + 0.45], color="black", lw=1.6, gid="target")
            end = max(end, target["bound"])  # the label clear of the tick
        ax.annotate(
            _label(name, values[name], runs), (end, yi), xytext=(4, 0),
            textcoords="offset points", va="center", fontsize=7,
        )  # fmt: skip
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.grid(axis="x", alpha=0.3)


def _title(result: dict, runs: list[dict]) -> str:
    run, timing = result.get("run", {}), result.get("timing", {})
    setting = result.get("setting", {})
    model = {"lenet5": "LeNet-5 on digits28"}.get(setting.get("model", "mlp"), "MLP")
    title = (
        f"SpaM training cost, {model}, N = {setting.get('n', '?')}, "
        f"{setting.get('epochs', '?')} epochs"
        f" — {run.get('card', '?')}, {run.get('threads', '?')} thread(s), "
        f"{_when(result)} UTC, best of {timing.get('repeats', '?')} runs per case"
    )
    if len(runs) > 1:
        dates = sorted(_when(r) for r in runs)
        title += f"\nwhiskers: all {len(runs)} runs, {dates[0]} – {dates[-1]} UTC"
    return title


def _when(result: dict) -> str:
    return str(result.get("run", {}).get("date", "?"))[:16].replace("T", " ")


def plot_training(result: dict, path: Path, others: list[dict] | None = None):
    """Draw ``result`` (the JSON ``bench_training.py`` writes) into ``path``, with whiskers
    over ``others`` (more runs of the same setting; a copy of ``result`` among them counts
    once) too; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    others = [other for other in others or [] if other != result]  # the headline once
    check_same_setting(result, others)
    runs = [result, *others]
    ratios = result["ratios"]
    relative = result.get("relative", {})
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10.5, 0.3 * len(ratios) + 1.9), width_ratios=(3, 1.5)
    )
    _panel(left, result, "ratios", list(ratios), runs)
    top = 2.0 * max(r for run in runs for r in run["ratios"].values())
    left.set_xscale("log")
    left.set_xlim(0.5, top)
    left.set_xticks([t for t in (0.5, 1, 2, 5, 10, 20, 50, 100) if t < top])
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    left.axvline(1.0, color="black", lw=0.6)
    left.set_xlabel("run time (× plain PyTorch MAP loop, log scale)", fontsize=8)
    if relative:
        labels = [name.replace("spam_", "").replace("_ggn_refit", "") for name in relative]
        _panel(right, result, "relative", labels, runs)
        seen = [v for run in runs for v in run.get("relative", {}).values()]
        right.set_xlim(0, 2.1 * max([*seen, *_bounds(result, relative)]))
        right.set_ylim(-1.5, len(relative) + 0.5)
        right.set_xlabel("× the layerwise run (same curvature)", fontsize=8)
    else:
        right.set_axis_off()
    fig.suptitle(_title(result, runs), fontsize=9)
    legend = [
        Patch(color=MET, label="target met"),
        Patch(color=MISSED, label="target missed"),
        Line2D([], [], color="black", lw=1.6, label="target"),
        Patch(color=REFERENCE, label="laplace-torch"),
        Patch(color=OTHER, label="no target"),
    ]
    if len(runs) > 1:
        legend.append(Line2D([], [], color="black", lw=0.9, label="range over runs"))
    right.legend(handles=legend, loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _bounds(result: dict, names) -> list[float]:
    targets = result.get("targets", {})
    return [targets[name]["bound"] for name in names if name in targets]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="the headline run (bench_training.py JSON)")
    parser.add_argument("more", type=Path, nargs="*", help="more runs of the same setting")
    parser.add_argument("--out", type=Path, help="PNG path (default: the headline's .png)")
    args = parser.parse_args(argv)
    out = args.out or args.result.with_suffix(".png")
    runs = [json.loads(path.read_text()) for path in [args.result, *args.more]]
    plot_training(runs[0], out, runs[1:])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
