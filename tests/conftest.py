"""Suite-wide set-up: Triton in its interpreter without a GPU, and a run that fails loudly.

``TRITON_INTERPRET`` is read when a Triton kernel is decorated, so it is set here, before
any test module imports spamkern's kernels; a kernel imported too early is then a test
failure, never a skip.

Only tests marked ``gpu`` may be skipped (they skip themselves without a CUDA device). Any
other skip — a missing feature, dependency or tool — fails the whole run, so a broken build
can never pass as "some tests skipped". ``--allow-skips`` turns that check off for ad-hoc
runs on incomplete machines; CI never passes it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_UNEXPECTED: list[str] = []


def pytest_addoption(parser):
    parser.addoption(
        "--allow-skips",
        action="store_true",
        default=False,
        help="do not fail the run when tests other than the GPU-only ones are skipped",
    )


def pytest_collection_modifyitems(config, items):
    """A ``gpu`` test skips itself on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


def _allowed(report) -> bool:
    return "gpu" in getattr(report, "keywords", {})


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail") and not _allowed(report):
        _UNEXPECTED.append(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped (importorskip, module-level skip)
        _UNEXPECTED.append(f"{report.nodeid} (whole module): {report.longrepr}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _UNEXPECTED and not config.getoption("--allow-skips"):
        terminalreporter.section("skips outside the GPU-only tests (these fail the run)")
        for line in _UNEXPECTED:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    ok = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    if _UNEXPECTED and not session.config.getoption("--allow-skips") and exitstatus in ok:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
