"""Sparse-inference tests: Triton runs in its CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set before anything
imports the kernel modules. Measured timings go to a per-test cache folder, never ~/.cache,
and the Triton launch configuration is not tuned (on a GPU that would compile dozens).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path, monkeypatch):
    from spamkern.sparse import tables

    monkeypatch.setenv("SPAMKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPAMKERN_AUTOTUNE", "0")  # tests check results, not launch tuning
    tables.forget_user_cache()
    yield
    tables.forget_user_cache()
