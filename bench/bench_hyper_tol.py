"""What ``hyper_tol`` buys: SpaM training time against the evidence it leaves behind.

    python bench/bench_hyper_tol.py            # the table and plot (CPU, 1 thread: about 2 min)
    python bench/bench_hyper_tol.py --quick    # small sizes: checks that every case runs
    python -m pytest bench/bench_hyper_tol.py  # the same cases, pytest-benchmark

The setting of ``bench/bench_training.py`` (MLP 784-256-256-10, N = 4096, batch 128,
4 epochs, exact-GGN Kronecker refit, a marglik step every epoch, the fixed-point update).
For each prior and tolerance the run is timed (best of ``--repeats``) as a multiple of the
plain MAP loop timed around it and of the layerwise run at the default tolerance, and its
evidence evaluations and final log evidence per marglik step are kept. The first marglik
step sees the same posterior at every tolerance (θ has not yet felt the prior), so its
evidence compares the tolerances directly; later steps differ by the trajectories as well.
Writes ``bench/results/cpu-hyper-tol.json`` and ``.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import Setting, Work, plain_loop, spamkern_run  # noqa: E402
from conftest import (  # noqa: E402
    headless_pyplot,
    markdown_table,
    run_conditions,
    save_results,
    script_parser,
    time_call,
)

from spamkern.marglik.hyper import DEFAULT_TOL  # noqa: E402

GPU_MODE = False  # a CPU trade-off table; the GPU phase leaves it out
PRIORS = ("layerwise", "unitwise", "parameterwise")
TOLERANCES = (DEFAULT_TOL, 1e-5, 1e-4)


def timed_run(work: Work, prior: str, tol: float) -> tuple[float, list[dict]]:
    """(seconds, the marglik records: evaluations and log evidence) of one SpaM run."""
    tic = time.perf_counter()
    result = spamkern_run(work, prior=prior, hyper_tol=tol)
    seconds = time.perf_counter() - tic
    steps = [
        {"evaluations": h["hyper_evaluations"], "marglik": h["marglik"]}
        for h in result.history
        if h["marglik"] is not None
    ]
    return seconds, steps


def sweep(setting: Setting, repeats: int) -> dict:
    """Every (prior, tolerance) case, each run followed by a plain loop (its denominator)."""
    work = Work(setting, torch.device("cpu"))
    spamkern_run(Work(Setting(n=256, epochs=1, hypersteps=2), work.device))  # warm-up
    plain = time_call(plain_loop, work)
    cases = []
    for prior in PRIORS:
        for tol in TOLERANCES:
            runs = [
                (timed_run(work, prior, tol), time_call(plain_loop, work)) for _ in range(repeats)
            ]
            (seconds, steps), _ = min(runs, key=lambda r: r[0][0])
            plain = min([plain] + [p for _, p in runs])
            cases.append({"prior": prior, "tol": tol, "seconds": seconds, "steps": steps})
            evals = sum(s["evaluations"] for s in steps)
            print(f"{prior:14s} tol {tol:6.0e}  {seconds:6.2f} s  {evals:3d} evaluations")
    reference = next(c for c in cases if c["prior"] == "layerwise" and c["tol"] == DEFAULT_TOL)
    for case in cases:
        case["x_plain_loop"] = case["seconds"] / plain
        case["x_layerwise_default"] = case["seconds"] / reference["seconds"]
        default = next(c for c in cases if c["prior"] == case["prior"] and c["tol"] == DEFAULT_TOL)
        case["first_step_evidence_gap"] = (
            case["steps"][0]["marglik"] - default["steps"][0]["marglik"]
        )
    return {
        "run": run_conditions(),
        "setting": setting.__dict__,
        "timing": f"best of {repeats} runs; plain loop: the best one timed around them",
        "plain_loop_s": plain,
        "cases": cases,
    }


def markdown(result: dict) -> str:
    header = [
        "prior", "hyper_tol", "× plain loop", "× layerwise (default tol)", "evaluations per step",
        "first-step evidence − default's",
    ]  # fmt: skip
    rows = [
        [
            c["prior"],
            f"{c['tol']:.0e}",
            f"{c['x_plain_loop']:.2f}",
            f"{c['x_layerwise_default']:.2f}",
            ", ".join(str(s["evaluations"]) for s in c["steps"]),
            f"{c['first_step_evidence_gap']:+.3f}",
        ]  # fmt: skip
        for c in result["cases"]
    ]
    return markdown_table(header, rows)


def plot(result: dict, path: Path) -> None:
    """Run time (× plain loop) against the tolerance, one line per prior."""
    plt = headless_pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for prior in PRIORS:
        mine = [c for c in result["cases"] if c["prior"] == prior]
        ax.plot([c["tol"] for c in mine], [c["x_plain_loop"] for c in mine], "o-", label=prior)
    ax.set_xscale("log")
    ax.set_xlabel("hyper_tol (log evidence per data point)")
    ax.set_ylabel("SpaM run time (× plain MAP loop)")
    ax.set_title("4-epoch SpaM run, marglik step every epoch", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, "small sizes (a check, not numbers)", repeats=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = sweep(Setting.quick() if args.quick else Setting(), args.repeats)
    print(markdown(result))
    save_results(result, args.out, "cpu-hyper-tol", args.quick, plot)


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def setting_work(sizes, device) -> Work:
    """bench_training's setting (small sizes unless --full)."""
    return Work(Setting.quick() if sizes.quick else Setting(), device)


@pytest.mark.parametrize("tol", TOLERANCES)
@pytest.mark.parametrize("prior", PRIORS)
def test_hyper_tol(benchmark, timed, setting_work, prior, tol):
    benchmark.group = f"hyper_tol {prior}"
    epochs = setting_work.setting.epochs
    benchmark.extra_info.update(prior=prior, hyper_tol=tol, epochs=epochs)
    steps = timed(lambda: timed_run(setting_work, prior, tol)[1], rounds=1)
    assert len(steps) == epochs and all(s["evaluations"] >= 1 for s in steps)


if __name__ == "__main__":
    main()
