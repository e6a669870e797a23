"""Run the curvature benchmarks once and write bench/results/<card>-curvature.json.

    python bench/run_curvature_gpu.py            # on a GPU machine, full sizes
    python bench/run_curvature_gpu.py --quick    # CPU check; writes cpu-curvature-quick.json

All cases run in one pytest process (so ratios compare like with like); the file records
the card, torch/triton/laplace-torch versions, the date, each case's median/min/max in ms,
the ratios to the sweep, and for each target the measured value and whether it
was met. CPU results are marked as such: they are not GPU numbers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# (name, model, numerator case, denominator case, kind, bound): kind "max" = ratio ≤ bound,
# "min" = ratio ≥ bound (a speed-up), "ms" = median of the numerator case ≤ bound ms
TARGETS = [
    ("mlp exact-GGN KFAC / staged sweep", "mlp", "spamkern_ggn", "sweep_staged", "max", 1.1),
    ("mlp EF KFAC / staged sweep", "mlp", "spamkern_ef", "sweep_staged", "max", 0.9),
    ("mlp MC KFAC / staged sweep", "mlp", "spamkern_ggn-mc", "sweep_staged", "max", 0.9),
    ("cnn exact GGN: plain torch / spamkern", "cnn", "plain_torch_ggn", "spamkern_ggn", "min", 2.0),
    (
        "cnn exact GGN: laplace AsdlGGN / spamkern",
        "cnn",
        "laplace_AsdlGGN",
        "spamkern_ggn",
        "min",
        4.0,
    ),
    ("cnn EF KFAC / staged sweep", "cnn", "spamkern_ef", "sweep_staged", "max", 1.5),
    ("cnn MC KFAC / staged sweep", "cnn", "spamkern_ggn-mc", "sweep_staged", "max", 1.5),
    (
        "mlp precision diag + OPD + threshold [ms]",
        "mlp",
        "precision_opd_threshold_auto",
        None,
        "ms",
        0.5,
    ),
] + [
    (f"{m} 100 hypersteps {p} [ms]", m, f"hypersteps100_{p}", None, "ms", 50.0)
    for m in ("mlp", "cnn")
    for p in ("layerwise", "parameterwise", "unitwise")
]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_suite(quick: bool, extra: list[str]) -> dict:
    """pytest-benchmark over bench/bench_curvature.py; its JSON report as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        cmd = [
            sys.executable, "-m", "pytest", str(ROOT / "bench" / "bench_curvature.py"),
            "-q", "-p", "no:cacheprovider", f"--benchmark-json={report}",
            "--benchmark-columns=median,min,max,rounds", "--benchmark-sort=name",
        ] + (["--quick"] if quick else []) + extra  # fmt: skip
        env = dict(os.environ)
        env.pop("SPAMKERN_BACKEND", None)  # auto: Triton on a GPU, the reference on a CPU
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if not report.exists():
            raise SystemExit(f"the benchmark run failed (exit {proc.returncode}); no report")
        data = json.loads(report.read_text())
        data["exit_code"] = proc.returncode
        return data


def summarise(data: dict, judge: bool = True) -> tuple[dict, dict, list]:
    """(cases[model][case] in ms, ratios to the sweeps, target checks)."""
    cases: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        cases.setdefault(info["model"], {})[info["case"]] = {
            "median_ms": stats["median"] * 1e3,
            "min_ms": stats["min"] * 1e3,
            "max_ms": stats["max"] * 1e3,
            "rounds": stats["rounds"],
            **{k: v for k, v in info.items() if k not in ("model", "case")},
        }
    ratios = {}
    for model, by_case in cases.items():
        for base in ("sweep_staged", "sweep_loader"):
            if base in by_case:
                b = by_case[base]["median_ms"]
                ratios[f"{model} / {base}"] = {
                    c: round(v["median_ms"] / b, 3) for c, v in sorted(by_case.items())
                }
    products = cases.get("factors", {})
    for case, value in sorted(products.items()):
        if case.endswith("_triton") and case[: -len("_triton")] + "_torch" in products:
            torch_ms = products[case[: -len("_triton")] + "_torch"]["median_ms"]
            ratios.setdefault("factor products: torch / triton", {})[case[:-7]] = round(
                torch_ms / value["median_ms"], 3
            )
    checks = []
    for name, model, num, den, kind, bound in TARGETS:
        by_case = cases.get(model, {})
        value = None
        if num in by_case and (den is None or den in by_case):
            value = by_case[num]["median_ms"]
            if den is not None:
                value /= by_case[den]["median_ms"]
        met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        if not judge:  # CPU / quick numbers say nothing about the GPU targets
            met = None
        sign = "≥" if kind == "min" else "≤"
        checks.append({"target": f"{name} {sign} {bound}", "measured": value, "met": met})
    return cases, ratios, checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU check)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)

    data = run_suite(args.quick, args.pytest_args)
    gpu_run = torch.cuda.is_available() and not args.quick
    cases, ratios, checks = summarise(data, judge=gpu_run)
    card = _card()
    result = {
        "card": card,
        "gpu": torch.cuda.is_available(),
        "note": (
            "GPU run at full sizes"
            if gpu_run
            else "CPU/quick run: NOT GPU numbers; checks that the suite works, not the targets"
        ),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "laplace-torch": _version("laplace-torch"),
            "python": sys.version.split()[0],
        },
        "quick": args.quick,
        "cpu_threads": None if torch.cuda.is_available() else 1,  # fixed by bench/conftest.py
        "pytest_exit_code": data["exit_code"],
        "targets": checks,
        "ratios": ratios,
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = args.out / f"{_slug(card)}-curvature{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    for check in checks:
        measured = "missing" if check["measured"] is None else f"{check['measured']:.3f}"
        print(f"  {check['target']:<60} {measured:>10}  met={check['met']}")


if __name__ == "__main__":
    main()
