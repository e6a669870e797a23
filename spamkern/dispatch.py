"""One switch for every hot operation: ``SPAMKERN_BACKEND=auto|torch|triton|cuda|cpp``.

Each operation (factor accumulation, log det, precision diagonal, block-sparse matmul, ...)
has a pure-torch reference registered under ``"torch"`` and any number of fast versions.
``select_impl(op, *tensors)`` returns the implementation to run for those tensors:

* an explicit backend is honoured when the op has it and it can run on the tensors' device,
  otherwise the call fails loudly (so a benchmark never measures a silent fallback);
* ``auto`` picks, in order, cuda → triton → torch on a GPU and cpp → torch on the CPU.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` and only when asked for
explicitly (the interpreter is for testing, not speed).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


@dataclass
class ImplInfo:
    """A registered implementation: the function and a test of whether it can run."""

    fn: Callable
    backend: str
    supports: Callable[..., bool] = field(default=lambda *tensors: True)


_REGISTRY: dict[str, dict[str, ImplInfo]] = {}


def register_impl(op: str, backend: str, supports: Callable[..., bool] | None = None):
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        info = ImplInfo(fn, backend, supports or (lambda *tensors: True))
        _REGISTRY.setdefault(op, {})[backend] = info
        return fn

    return wrap


def requested_backend() -> str:
    """The backend named by ``SPAMKERN_BACKEND`` (default ``auto``), validated."""
    name = os.environ.get("SPAMKERN_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"SPAMKERN_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def triton_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device`` (a GPU, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_of(tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _can_run(info: ImplInfo, device: torch.device, tensors) -> bool:
    if info.backend == "triton" and not triton_usable(device):
        return False
    if info.backend == "cuda" and device.type != "cuda":
        return False
    if info.backend == "cpp" and device.type != "cpu":
        return False
    return bool(info.supports(*tensors))


def available_backends(op: str) -> list[str]:
    """Backends registered for ``op`` (whether or not they can run here)."""
    _ensure_loaded()
    return sorted(_REGISTRY.get(op, {}))


def select_impl(op: str, *tensors, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to run on ``tensors`` under the requested backend."""
    _ensure_loaded()
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    name = backend or requested_backend()
    device = _device_of(tensors)
    if name != "auto":
        info = impls.get(name)
        if info is None:
            raise ValueError(
                f"op {op!r} has no {name!r} backend; available: {sorted(impls)} "
                "(set SPAMKERN_BACKEND=auto to choose automatically)"
            )
        if not _can_run(info, device, tensors):
            raise ValueError(
                f"the {name!r} backend of op {op!r} cannot run on these inputs "
                f"(device {device}); Triton on the CPU needs TRITON_INTERPRET=1"
            )
        return info.fn
    order = _AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
    for candidate in order:
        info = impls.get(candidate)
        if info is not None and _can_run(info, device, tensors):
            return info.fn
    return impls["torch"].fn


_LOADED = False


def _ensure_loaded() -> None:
    """Import the modules that register fast implementations (once, lazily)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import warnings

    for loader in (load_kernels, lambda: importlib.import_module("spamkern._ext")):
        try:
            loader()
        except ImportError as err:  # a kernel module that exists but cannot be imported
            warnings.warn(
                f"spamkern kernels could not be imported ({err}); they are off",
                RuntimeWarning,
                stacklevel=3,
            )


def load_kernels():
    """``spamkern.kernels`` (the top-level ``kernels/`` folder, mapped into the package by
    setup.py); in a source checkout without an install it is loaded from its folder."""
    try:
        return importlib.import_module("spamkern.kernels")
    except ModuleNotFoundError as err:
        if err.name != "spamkern.kernels":
            raise
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not source.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        "spamkern.kernels", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["spamkern.kernels"] = module
    spec.loader.exec_module(module)
    return module
