"""Plot a ``bench_training.py`` result: every run as a multiple of the plain loop, with targets.

    python bench/training_plot.py bench/results/cpu-training.json   # writes the .png beside it

``bench_training.py`` calls :func:`plot_training` after every full run. Left panel: each
case's best run over the plain loop timed around it (log scale), the cases with a target
green where met and red where missed, the target itself a black tick; laplace-torch's
loops, the reference, in orange. Right panel: the unitwise and parameterwise runs over the
layerwise one, timed in turn, against their bounds.
"""

from __future__ import annotations

import json
import sys
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


def _panel(ax, result: dict, values: dict[str, float], labels: list[str]) -> None:
    names = list(values)
    y = list(range(len(names)))[::-1]  # the table's order, top to bottom
    ax.barh(y, [values[n] for n in names], color=bar_colours(result, names), height=0.7)
    for yi, name in zip(y, names):
        target = result.get("targets", {}).get(name)
        end = values[name]
        if target is not None:
            bound = [target["bound"]] * 2
            ax.plot(bound, [yi - 0.45, yi + 0.45], color="black", lw=1.6, gid="target")
            end = max(end, target["bound"])  # the label clear of the tick
        ax.annotate(
            f"{values[name]:.2f}×", (end, yi), xytext=(4, 0),
            textcoords="offset points", va="center", fontsize=7,
        )  # fmt: skip
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.grid(axis="x", alpha=0.3)


def plot_training(result: dict, path: Path):
    """Draw ``result`` (the JSON ``bench_training.py`` writes) into ``path``; the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ratios = result["ratios"]
    relative = result.get("relative", {})
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10, 0.3 * len(ratios) + 1.6), width_ratios=(3, 1.4)
    )
    _panel(left, result, ratios, list(ratios))
    left.set_xscale("log")
    left.set_xlim(0.5, 2.0 * max(ratios.values()))
    left.set_xticks([t for t in (0.5, 1, 2, 5, 10, 20, 50, 100) if t < 2.0 * max(ratios.values())])
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    left.axvline(1.0, color="black", lw=0.6)
    left.set_xlabel("run time (× plain PyTorch MAP loop, log scale)", fontsize=8)
    if relative:
        labels = [name.replace("spam_", "").replace("_ggn_refit", "") for name in relative]
        _panel(right, result, relative, labels)
        right.set_xlim(0, 1.35 * max([*relative.values(), *_bounds(result, relative)]))
        right.set_ylim(-1.5, len(relative) + 0.5)
        right.set_xlabel("× the layerwise run (same curvature)", fontsize=8)
    else:
        right.set_axis_off()
    run, timing = result.get("run", {}), result.get("timing", {})
    setting = result.get("setting", {})
    fig.suptitle(
        f"SpaM training cost, N = {setting.get('n', '?')}, {setting.get('epochs', '?')} epochs"
        f" — {run.get('card', '?')}, {run.get('threads', '?')} thread(s), "
        f"{str(run.get('date', '?'))[:16].replace('T', ' ')} UTC, "
        f"best of {timing.get('repeats', '?')} runs per case",
        fontsize=9,
    )
    legend = [
        Patch(color=MET, label="target met"),
        Patch(color=MISSED, label="target missed"),
        Line2D([], [], color="black", lw=1.6, label="target"),
        Patch(color=REFERENCE, label="laplace-torch"),
        Patch(color=OTHER, label="no target"),
    ]
    right.legend(handles=legend, loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _bounds(result: dict, names) -> list[float]:
    targets = result.get("targets", {})
    return [targets[name]["bound"] for name in names if name in targets]


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python bench/training_plot.py RESULT.json")
    source = Path(argv[0])
    out = source.with_suffix(".png")
    plot_training(json.loads(source.read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
