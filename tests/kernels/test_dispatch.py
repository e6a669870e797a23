"""The backend switch: a preference per op, a demand per call, and kernel modules that fail
to load reported once without taking the other backends down."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import spamkern as sk
from spamkern import _ext, dispatch
from spamkern.ops.factors import gram_reference
from spamkern.sparse import BlockSparseWeight, bsr_linear

ROOT = Path(__file__).resolve().parents[2]


def _bsr_case():
    gen = torch.Generator().manual_seed(3)
    w = BlockSparseWeight.from_dense(torch.randn(32, 48, generator=gen), 16)
    return torch.randn(5, 48, generator=gen), w


def test_env_backend_is_a_preference_per_op(monkeypatch):
    """SPAMKERN_BACKEND=cpp runs the C++ kernel where the op has one, the reference elsewhere."""
    monkeypatch.setenv("SPAMKERN_BACKEND", "cpp")
    x, w = _bsr_case()
    assert dispatch.select_backend("bsr_linear", x, w.blocks_t) == "cpp"
    assert dispatch.select_backend("gram", x) == "torch"
    assert dispatch.select_impl("gram", x) is gram_reference
    torch.testing.assert_close(bsr_linear(x, w), x @ w.to_dense().T)


def test_fit_laplace_runs_under_every_backend_preference(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, generator=gen).double(), torch.randint(0, 3, (12,), generator=gen)
    evidences = []
    for backend in ("cpp", "torch", "auto"):
        monkeypatch.setenv("SPAMKERN_BACKEND", backend)
        post = sk.fit_laplace(model, (x, y), structure="kron", progress=False)
        evidences.append(post.log_marginal_likelihood().item())
    assert evidences[0] == pytest.approx(evidences[1], rel=1e-10)
    assert evidences[2] == pytest.approx(evidences[1], rel=1e-10)


def test_explicit_backend_is_a_demand():
    x, w = _bsr_case()
    with pytest.raises(ValueError, match="has no 'cpp' backend"):
        dispatch.select_impl("gram", x, backend="cpp")
    with pytest.raises(ValueError, match="cannot run on these inputs"):
        dispatch.select_impl("bsr_linear", x.double(), w.blocks_t.double(), backend="cpp")


def test_unknown_backend_name_is_refused(monkeypatch):
    monkeypatch.setenv("SPAMKERN_BACKEND", "fortran")
    with pytest.raises(ValueError, match="SPAMKERN_BACKEND='fortran' is not one of"):
        dispatch.select_impl("gram", torch.zeros(2, 2))


def test_compiled_kernels_route_through_torch_dispatch():
    """One custom op with per-device kernels registered in C++; no device branch in Python."""
    assert _ext.AVAILABLE, _ext.LOAD_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key("spamkern::bsr_linear", "CPU")
    assert dispatch._REGISTRY["bsr_linear"]["cpp"].fn is _ext.bsr_linear_compiled
    x, w = _bsr_case()
    y = torch.ops.spamkern.bsr_linear(
        x, w.row_ptr, w.col_idx, w.blocks_t, w.row_order, None, w.shape[0]
    )
    torch.testing.assert_close(y, x @ w.to_dense().T)


def test_unknown_kernel_module_is_refused():
    with pytest.raises(ValueError, match="unknown kernel module"):
        dispatch.kernel_module("nope")


_BROKEN_MODULE = textwrap.dedent(
    """
    import importlib.abc, os, sys, warnings

    os.environ["TRITON_INTERPRET"] = "1"

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "spamkern.kernels.opd":
                raise RuntimeError("simulated: kernel does not compile")
            return None

    sys.meta_path.insert(0, Broken())
    import torch
    from spamkern import dispatch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(6, 4)
        for _ in range(3):
            dispatch.select_impl("gram", x)
            dispatch.select_impl("precision_and_opd", x[0])
    ours = [str(c.message) for c in caught if "kernel module" in str(c.message)]
    assert len(ours) == 1, ours
    assert "kernels/opd.py" in ours[0] and "RuntimeError" in ours[0], ours[0]
    assert "does not compile" in dispatch.load_errors()["kernels/opd.py"]
    assert "triton" not in dispatch.available_backends("precision_and_opd")
    assert "triton" in dispatch.available_backends("gram")
    assert "triton" in dispatch.available_backends("bsr_linear")
    assert "cpp" in dispatch.available_backends("bsr_linear")
    print("OK")
    """
)


def test_broken_kernel_module_is_reported_once_and_spares_the_others():
    result = subprocess.run(
        [sys.executable, "-c", _BROKEN_MODULE], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
