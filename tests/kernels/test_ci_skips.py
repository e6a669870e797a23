"""The suite fails when anything but a GPU-only test is skipped (tests/conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "extra",
    [
        "\ndef test_skipped():\n    pytest.skip('feature missing')\n",
        "\nnothing = pytest.importorskip('a_module_that_is_not_there')\n",
        "\n@pytest.mark.skipif(True, reason='tool missing')\ndef test_skipif():\n    pass\n",
    ],
    ids=["skip", "importorskip", "skipif"],
)
def test_any_other_skip_fails_the_run(tmp_path, extra):
    result = _run(tmp_path, extra)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "skips outside the GPU-only tests" in result.stdout
    allowed = _run(tmp_path, extra, "--allow-skips")  # 5: pytest's "no tests collected"
    assert allowed.returncode in (0, 5), allowed.stdout[-2000:]
