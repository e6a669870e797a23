"""The suite fails when anything but a GPU-only test is skipped (tests/conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

_TESTS = """
import pytest

@pytest.mark.gpu
def test_gpu_only():
    pass

def test_plain():
    pass
"""


def _run(tmp_path: Path, extra: str, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(_TESTS + extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
         "-m", "", "-W", "ignore::pytest.PytestUnknownMarkWarning", *args, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip


def test_only_gpu_tests_skipped_passes(tmp_path):
    import torch

    result = _run(tmp_path, "")
    assert result.returncode == 0, result.stdout[-2000:]
    assert ("1 skipped" in result.stdout) != torch.cuda.is_available()


_BAD_SKIPS = {
    "test_cases.py::test_skipped": "\ndef test_skipped():\n    pytest.skip('feature missing')\n",
    "test_cases.py::test_skipif": (
        "\n@pytest.mark.skipif(True, reason='tool missing')\ndef test_skipif():\n    pass\n"
    ),
}


def test_any_other_skip_fails_the_run(tmp_path):
    result = _run(tmp_path, "".join(_BAD_SKIPS.values()))
    assert result.returncode == 1, result.stdout[-2000:]
    report = result.stdout.split("skips outside the GPU-only tests")[1]
    assert all(node in report for node in _BAD_SKIPS), report
    assert "test_gpu_only" not in report
    allowed = _run(tmp_path, "".join(_BAD_SKIPS.values()), "--allow-skips")
    assert allowed.returncode == 0, allowed.stdout[-2000:]


def test_a_skipped_module_fails_the_run(tmp_path):
    result = _run(tmp_path, "\nnothing = pytest.importorskip('a_module_that_is_not_there')\n")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "(whole module)" in result.stdout
