"""Run the Triton kernels on the GPU when there is one, else in Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before the
kernel modules are imported. In a source checkout the kernels live in the top-level
``kernels/`` folder (installed as ``spamkern.kernels``); both layouts are accepted.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import DEVICE  # noqa: E402

from spamkern import dispatch  # noqa: E402


def load_kernels():
    """The kernel package, registered with the dispatcher (None without triton)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return dispatch.load_kernels()


KERNELS = load_kernels()


def _interpreted(module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module.factors._sym_gram_kernel, InterpretedFunction)


@pytest.fixture
def triton_backend(monkeypatch):
    """Select the Triton backend for the test (fails when it cannot run here)."""
    if KERNELS is None:
        pytest.fail("triton is not installed")
    if DEVICE.type == "cpu" and not _interpreted(KERNELS):
        pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if DEVICE.type == "cpu" else "0")
    monkeypatch.setenv("SPAMKERN_BACKEND", "triton")
    return KERNELS
