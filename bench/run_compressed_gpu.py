"""GPU phase of bench_compressed: time dense vs compressed models on the card only.

python bench/run_compressed_gpu.py --out DIR [--quick]
"""

from __future__ import annotations

import argparse

import bench_compressed

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    bench_compressed.main(["--devices", "cuda", "--out", args.out] + ["--quick"] * args.quick)
