"""A convolution's Kronecker factors, one batch: spamkern against unfold + one product.

    python bench/bench_conv_factors.py            # the table and plot (CPU, 1 thread: ~1 min)
    python bench/bench_conv_factors.py --quick    # small batches: checks that every case runs
    python -m pytest bench/bench_conv_factors.py  # the same cases, pytest-benchmark

A: ``conv_patch_gram`` (row or column correlations, or channels-last patch rows, whichever
needs the fewest products) against its anchor ``F.unfold`` → rows → ``UᵀU``, the textbook
computation. G: ``gram_of_columns`` on the output gradients as (samples, channels,
positions) against transposing them to rows and one triangle of their product
(``gram_upper``). Shapes: LeNet-5's convolutions on 28 × 28 images, 3 × 3 convolutions of
CIFAR-style networks, a strided one and a 1 × 1 one; batch 128 (G: the 10 output columns of
an exact-GGN refit, 1 280 rows). Each case and its anchor run in turn; a ratio is the
anchor's best over the case's best. Writes ``bench/results/cpu-conv-factors.json`` and
``.png``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from conftest import (  # noqa: E402
    headless_pyplot,
    in_turn,
    markdown_table,
    run_conditions,
    save_results,
    script_parser,
)

from spamkern.ops import conv_patch_gram  # noqa: E402
from spamkern.ops.conv_gram import cheapest_route, output_size  # noqa: E402
from spamkern.ops.factors import gram_of_columns, gram_upper  # noqa: E402

GPU_MODE = False  # CPU routes against their CPU anchors; the GPU phase leaves it out
# name, (channels, height = width), kernel, stride, padding
A_CASES = [
    ("lenet5_conv1", (1, 28), 5, 1, 0),
    ("lenet5_conv2", (6, 12), 5, 1, 0),
    ("cifar_conv1", (3, 32), 3, 1, 1),
    ("conv_16x16_c16", (16, 16), 3, 1, 1),
    ("conv_16x32_c16", (16, 32), 3, 1, 1),
    ("conv_8x8_c64", (64, 8), 3, 1, 1),
    ("conv_16x16_c64_stride2", (64, 16), 3, 2, 1),
    ("conv_16x16_c64_1x1_stride2", (64, 16), 1, 2, 0),
]
# name, (rows = output columns × batch, channels, positions)
G_CASES = [
    ("lenet5_conv1", (1280, 6, 576)),
    ("lenet5_conv2", (1280, 16, 64)),
    ("conv_16x16_c16", (1280, 16, 256)),
    ("conv_8x8_c64", (1280, 64, 64)),
]


def unfold_gram(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """The anchor: unfold the patches, transpose them to rows, one product."""
    u = F.unfold(x, kernel, padding=padding, stride=stride)
    u = u.transpose(1, 2).reshape(-1, u.shape[1])
    return u.T @ u


def rows_gram(g: torch.Tensor) -> torch.Tensor:
    """The G anchor: output gradients transposed to rows, one triangle of their product."""
    return gram_upper(g.transpose(1, 2).reshape(-1, g.shape[1]))


def a_pair(batch: int, shape, kernel: int, stride: int, padding: int):
    """(spamkern, anchor) for one input factor, on one fresh batch."""
    x = torch.randn(batch, shape[0], shape[1], shape[1])
    geometry = ((kernel, kernel), (stride, stride), (padding, padding), (1, 1))
    return (lambda: conv_patch_gram(x, *geometry)), (
        lambda: unfold_gram(x, kernel, stride, padding)
    )


def g_pair(batch: int, shape):
    g = torch.randn(batch * shape[0] // 128, shape[1], shape[2])
    return (lambda: gram_of_columns(g)), (lambda: rows_gram(g))


def best_pair(case: Callable, anchor: Callable, repeats: int) -> tuple[float, float]:
    """(case's best, anchor's best) seconds, the two run in turn ``repeats`` times."""
    case(), anchor()  # first calls (allocations, library set-up) are not timed
    times = in_turn(case, anchor, repeats)
    return min(t for t, _ in times), min(a for _, a in times)


def route_of(batch: int, shape, kernel: int, stride: int, padding: int) -> str:
    sizes = (output_size(shape[1], kernel, stride, padding, 1),) * 2
    dims = (batch, shape[0], shape[1], shape[1])
    return cheapest_route(dims, (kernel, kernel), (stride, stride), (1, 1), sizes)


def run_table(batch: int, repeats: int) -> dict:
    cases = []
    for name, shape, kernel, stride, padding in A_CASES:
        mine, anchor = best_pair(*a_pair(batch, shape, kernel, stride, padding), repeats)
        route = route_of(batch, shape, kernel, stride, padding)
        geometry = {"channels": shape[0], "hw": shape[1], "kernel": kernel, "stride": stride}
        cases.append(_case("A", name, geometry | {"route": route}, mine, anchor))
    for name, shape in G_CASES:
        mine, anchor = best_pair(*g_pair(batch, shape), repeats)
        geometry = {"rows": shape[0] * batch // 128, "channels": shape[1], "positions": shape[2]}
        cases.append(_case("G", name, geometry, mine, anchor))
    return {
        "run": run_conditions(),
        "batch": batch,
        "timing": f"best of {repeats}, each case and its anchor in turn; speedup = anchor/case",
        "cases": cases,
    }


def _case(factor: str, name: str, geometry: dict, mine: float, anchor: float) -> dict:
    print(f"{factor} {name:28s} {anchor * 1e3:8.2f} ms → {mine * 1e3:8.2f} ms", flush=True)
    return {
        "factor": factor, "name": name, **geometry, "anchor_ms": anchor * 1e3,
        "spamkern_ms": mine * 1e3, "speedup": anchor / mine,
    }  # fmt: skip


def markdown(result: dict) -> str:
    header = ["factor", "case", "route", "unfold/rows + product (ms)", "spamkern (ms)", "speedup"]
    rows = [
        [
            c["factor"],
            c["name"],
            c.get("route", "per-sample products"),
            f"{c['anchor_ms']:.2f}",
            f"{c['spamkern_ms']:.2f}",
            f"{c['speedup']:.2f}×",
        ]  # fmt: skip
        for c in result["cases"]
    ]
    return markdown_table(header, rows)


def plot(result: dict, path: Path) -> None:
    """Speedup over the anchor per case, A and G side by side."""
    plt = headless_pyplot()

    cases = result["cases"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colors = ["tab:blue" if c["factor"] == "A" else "tab:orange" for c in cases]
    ax.barh(range(len(cases)), [c["speedup"] for c in cases], color=colors)
    ax.set_yticks(range(len(cases)), [f"{c['factor']}: {c['name']}" for c in cases], fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over unfold + one product (A) / rows + one triangle (G)")
    run = result["run"]
    ax.set_title(
        f"Conv Kronecker factors, batch {result['batch']} — {run.get('card', '?')}, "
        f"{run.get('threads', '?')} thread(s), {run.get('date', '?')}",
        fontsize=8,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, "batch 16 (a check, not numbers)", repeats=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = run_table(16 if args.quick else 128, args.repeats)
    print(markdown(result))
    save_results(result, args.out, "cpu-conv-factors", args.quick, plot)


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("which", ["spamkern", "anchor"])
@pytest.mark.parametrize("case", A_CASES, ids=[c[0] for c in A_CASES])
def test_input_factor(benchmark, timed, sizes, which, case):
    name, shape, kernel, stride, padding = case
    benchmark.group = f"conv A {name}"
    pair = a_pair(16 if sizes.quick else 128, shape, kernel, stride, padding)
    timed(pair[0] if which == "spamkern" else pair[1], rounds=sizes.rounds)


@pytest.mark.parametrize("which", ["spamkern", "anchor"])
@pytest.mark.parametrize("case", G_CASES, ids=[c[0] for c in G_CASES])
def test_output_factor(benchmark, timed, sizes, which, case):
    name, shape = case
    benchmark.group = f"conv G {name}"
    pair = g_pair(16 if sizes.quick else 128, shape)
    timed(pair[0] if which == "spamkern" else pair[1], rounds=sizes.rounds)


if __name__ == "__main__":
    main()
