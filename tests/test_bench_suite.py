"""``pytest bench`` collects every benchmark file (``make bench`` runs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_bench_collects_every_benchmark_file():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    files = {f"bench/{p.name}" for p in (ROOT / "bench").glob("bench_*.py")}
    assert files and collected == files, (files, collected)
