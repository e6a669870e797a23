"""``pytest bench`` collects every benchmark file (``make bench`` runs them)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _bench_helpers():
    """bench/conftest.py under a name of its own (tests/ has a conftest too)."""
    spec = importlib.util.spec_from_file_location("bench_helpers", ROOT / "bench" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_script_parser_takes_the_shared_options_and_refuses_zero_repeats(capsys):
    helpers = _bench_helpers()
    parser = helpers.script_parser("Time things.\n\nMore.", "tiny sizes", repeats=4)
    args = parser.parse_args(["--quick", "--out", "x.json"])
    assert (args.quick, args.repeats, args.out) == (True, 4, Path("x.json"))
    assert parser.description == "Time things."
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeats", "0"])
    assert "must be ≥ 1, got 0" in capsys.readouterr().err
    assert not hasattr(helpers.script_parser("Doc.", "tiny").parse_args([]), "repeats")


def test_save_results_writes_the_json_and_its_plot_where_asked(tmp_path, monkeypatch, capsys):
    helpers = _bench_helpers()
    drawn = []
    out = helpers.save_results(
        {"a": [1, 2]}, tmp_path / "r.json", "unused", plot=lambda r, p: drawn.append((r, p))
    )
    assert out == tmp_path / "r.json" and json.loads(out.read_text()) == {"a": [1, 2]}
    assert drawn == [({"a": [1, 2]}, tmp_path / "r.png")]
    monkeypatch.setattr(helpers, "RESULTS", tmp_path / "results")
    default = helpers.save_results({"b": 1}, None, "cpu-thing", quick=True)
    assert default == tmp_path / "results" / "cpu-thing-quick.json" and default.exists()
    assert f"wrote {default}" in capsys.readouterr().out
