"""Print the end-to-end training ratios of a bench_training.py pytest-benchmark JSON file."""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    with open(path) as handle:
        data = json.load(handle)
    median = {b["extra_info"]["case"]: b["stats"]["median"] for b in data["benchmarks"]}
    base = median["map_plain_torch"]
    for case, seconds in sorted(median.items()):
        print(f"{case:32s} {seconds * 1e3:10.1f} ms  {seconds / base:6.2f}× plain MAP training")
    for case, bound in (("spam_every_1_loader", 1.5), ("spam_every_5_loader", 1.15)):
        if case in median:
            ratio = median[case] / base
            print(
                f"target {case} ≤ {bound}×: {ratio:.2f}× ({'met' if ratio <= bound else 'missed'})"
            )


if __name__ == "__main__":
    main(sys.argv[1])
