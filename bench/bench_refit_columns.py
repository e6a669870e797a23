"""An exact-GGN refit pass with the C − 1 columns spamkern backpropagates vs the C columns
of the textbook square root of the softmax Hessian.

    python bench/bench_refit_columns.py            # the table (CPU, 1 thread: about 1 min)
    python bench/bench_refit_columns.py --quick    # small sizes: checks that every case runs
    python -m pytest bench/bench_refit_columns.py  # the same cases, pytest-benchmark

One ``fit_laplace`` pass (Kronecker, exact GGN, batch 128) on three classifiers: the MLP
784-256-256-10 of ``bench_training.py`` on its 4 096 random points, LeNet-5 on the 1 437
training images of digits28, and CancerNet (30-100-100-2) on breast_cancer's training split
repeated eight times (3 640 rows). The anchor swaps in the C columns √p_k (e_k − p); the
two run in turn, best of ``--repeats`` each. Writes ``bench/results/cpu-refit-columns.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import Setting, Work  # noqa: E402
from conftest import (  # noqa: E402
    in_turn,
    markdown_table,
    run_conditions,
    save_results,
    script_parser,
)

import spamkern as sk  # noqa: E402
from spamkern.curvature import likelihood  # noqa: E402
from spamkern.data.datasets import load_dataset  # noqa: E402
from spamkern.models import cancer_net  # noqa: E402

GPU_MODE = False  # a CPU comparison of two exact factorisations; the GPU phase leaves it out
MODELS = ("mlp", "lenet5", "cancer_net")


def full_root(p: torch.Tensor) -> torch.Tensor:
    """The anchor: C vectors √p_k (e_k − p), whose outer products also sum to diag(p) − ppᵀ."""
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return p.sqrt().unsqueeze(-1) * (eye - p.unsqueeze(1))


def problem(name: str, quick: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    if name == "cancer_net":
        X, y = load_dataset("breast_cancer").train
        X, y = (X, y) if quick else (X.repeat(8, 1), y.repeat(8))
        torch.manual_seed(0)
        return cancer_net(X.shape[1], 100, 2), X, y
    work = Work(Setting.of(name, quick=quick), torch.device("cpu"))
    return work.fresh(), work.X, work.y


def refit(model, X, y, root: Callable) -> None:
    """One exact-GGN Kronecker pass with ``root`` as the Hessian's square root."""
    saved = likelihood.softmax_hessian_root
    likelihood.softmax_hessian_root = root
    try:
        sk.fit_laplace(model, (X, y), curvature="ggn", batch_size=128, progress=False)
    finally:
        likelihood.softmax_hessian_root = saved


def run_table(quick: bool, repeats: int) -> dict:
    rows = []
    for name in MODELS:
        model, X, y = problem(name, quick)
        mine = partial(refit, model, X, y, likelihood.softmax_hessian_root)
        anchor = partial(refit, model, X, y, full_root)
        mine(), anchor()  # first calls untimed
        pairs = in_turn(mine, anchor, repeats)
        best, best_anchor = min(a for a, _ in pairs), min(b for _, b in pairs)
        rows.append({
            "model": name, "rows": X.shape[0], "seconds_c_minus_1": best,
            "seconds_c": best_anchor, "ratio": best / best_anchor,
        })  # fmt: skip
        print(f"{name:10s} C−1: {best * 1e3:7.1f} ms  C: {best_anchor * 1e3:7.1f} ms", flush=True)
    return {
        "run": run_conditions(),
        "timing": f"best of {repeats}, the two factorisations in turn",
        "cases": rows,
    }


def markdown(result: dict) -> str:
    header = ["model", "rows", "C − 1 columns (ms)", "C columns (ms)", "ratio"]
    rows = [
        [
            c["model"],
            str(c["rows"]),
            f"{c['seconds_c_minus_1'] * 1e3:.1f}",
            f"{c['seconds_c'] * 1e3:.1f}",
            f"{c['ratio']:.3f}",
        ]  # fmt: skip
        for c in result["cases"]
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, "small sizes (a check, not numbers)", repeats=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run_table(args.quick, args.repeats)
    print(markdown(result))
    save_results(result, args.out, "cpu-refit-columns", args.quick)


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("columns", ["c_minus_1", "c"])
@pytest.mark.parametrize("name", MODELS)
def test_refit_pass(benchmark, timed, sizes, name, columns):
    benchmark.group = f"exact-GGN refit {name}"
    model, X, y = problem(name, sizes.quick)
    root = full_root if columns == "c" else likelihood.softmax_hessian_root
    timed(lambda: refit(model, X, y, root), rounds=sizes.rounds)


if __name__ == "__main__":
    main()
