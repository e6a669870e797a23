"""Print the training ratios of a bench_training.py pytest-benchmark JSON file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import _targets  # noqa: E402


def main(path: str) -> None:
    with open(path) as handle:
        data = json.load(handle)
    by_model: dict[str, dict[str, float]] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        by_model.setdefault(info.get("model", "mlp"), {})[info["case"]] = bench["stats"]["median"]
    for model, median in by_model.items():
        if "plain_loop" not in median:
            print(f"{model}: no plain_loop run in {path}, no ratios")
            continue
        base = median["plain_loop"]
        ratios = {case: seconds / base for case, seconds in median.items()}
        print(f"## {model}")
        for case, seconds in median.items():
            print(f"{case:34s} {seconds * 1e3:10.1f} ms  {ratios[case]:6.2f}× the plain loop")
        for name, target in _targets(ratios).items():
            verdict = "met" if target["met"] else "missed"
            print(f"target {name}: {target['ratio']:.2f} ≤ {target['bound']} ({verdict})")


if __name__ == "__main__":
    main(sys.argv[1])
