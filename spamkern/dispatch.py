"""One switch for every hot operation: ``SPAMKERN_BACKEND=auto|torch|triton|cuda|cpp``.

Each operation (factor accumulation, log det, precision diagonal, block-sparse matmul, ...)
has a pure-torch reference registered under ``"torch"`` and any number of fast versions.
``select_impl(op, *tensors)`` returns the implementation to run for those tensors:

* ``SPAMKERN_BACKEND`` is a preference, per op: an op that has the named backend and can run
  it on the tensors' device uses it; any other op falls back to its ``auto`` choice (so
  ``SPAMKERN_BACKEND=cpp`` speeds up the ops that have C++ kernels and leaves the rest alone);
* ``select_impl(..., backend=name)`` is a demand: it fails loudly when ``op`` has no ``name``
  backend or cannot run it here (a benchmark never measures a silent fallback);
* ``auto`` picks, in order, cuda → triton → torch on a GPU and cpp → torch on the CPU.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` and only when asked for
(the interpreter is for testing, not speed).

The fast backends register themselves when their modules are imported, which happens once,
lazily, on the first selection: every Triton module of ``kernels/`` (:func:`kernel_module`)
and the compiled extension (``spamkern._ext``). A module that fails to import, with any
exception, is reported once in a ``RuntimeWarning`` naming it and the error, listed in
:func:`load_errors`, and never keeps the other modules from registering.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
# the Triton modules of kernels/, one per operation (each registers its kernels)
KERNEL_MODULES = ("factors", "opd", "select", "logdet", "block_sparse")
EXTENSION_MODULE = "spamkern._ext"


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
    if importlib.util.find_spec("triton") is None:
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


def _demanded(op: str, impls: dict[str, ImplInfo], name: str, device, tensors) -> ImplInfo:
    info = impls.get(name)
    if info is None:
        raise ValueError(
            f"op {op!r} has no {name!r} backend; available: {sorted(impls)} "
            "(leave backend unset to choose automatically)"
        )
    if not _can_run(info, device, tensors):
        raise ValueError(
            f"the {name!r} backend of op {op!r} cannot run on these inputs "
            f"(device {device}); Triton on the CPU needs TRITON_INTERPRET=1"
        )
    return info


def select_backend(op: str, *tensors, backend: str | None = None) -> str:
    """The name of the backend :func:`select_impl` runs for ``op`` on ``tensors``."""
    _ensure_loaded()
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    device = _device_of(tensors)
    if backend is not None and backend != "auto":
        return _demanded(op, impls, backend, device, tensors).backend
    preferred = requested_backend() if backend is None else "auto"
    order = _AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
    if preferred != "auto":
        order = (preferred, *order)
    for candidate in order:
        info = impls.get(candidate)
        if info is not None and _can_run(info, device, tensors):
            return candidate
    return "torch"


def select_impl(op: str, *tensors, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to run on ``tensors``: ``backend`` when given (strict),
    else ``SPAMKERN_BACKEND``'s choice where ``op`` has it, else the automatic one."""
    name = select_backend(op, *tensors, backend=backend)
    return _REGISTRY[op][name].fn


_LOADED = False
_LOAD_ERRORS: dict[str, str] = {}


def load_errors() -> dict[str, str]:
    """Kernel modules that failed to import in this process: module name → error."""
    _ensure_loaded()
    return dict(_LOAD_ERRORS)


def _report_load_failure(module: str, err: BaseException) -> None:
    _LOAD_ERRORS[module] = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"spamkern: kernel module {module} failed to load ({_LOAD_ERRORS[module]}); its "
        "backends are off, every other backend still runs",
        RuntimeWarning,
        stacklevel=4,
    )


def _ensure_loaded() -> None:
    """Import the modules that register fast implementations, each on its own (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # set first: the kernel modules import spamkern.ops, which may select
    loaders: list[tuple[str, Callable[[], object]]] = []
    if importlib.util.find_spec("triton") is not None:
        loaders += [(f"kernels/{n}.py", lambda n=n: kernel_module(n)) for n in KERNEL_MODULES]
    loaders.append((EXTENSION_MODULE, lambda: importlib.import_module(EXTENSION_MODULE)))
    for module, load in loaders:
        try:
            loaded = load()
        except Exception as err:  # any failure: say which module and why, keep the rest
            _report_load_failure(module, err)
            continue
        if getattr(loaded, "LOAD_ERROR", None):  # _ext warned already, with a rebuild hint
            _LOAD_ERRORS["spamkern._C"] = loaded.LOAD_ERROR


def _kernel_package() -> ModuleType:
    """``spamkern.kernels``: installed by setup.py from the top-level ``kernels/`` folder; in
    a source checkout without an install it is loaded from that folder under the same name."""
    try:
        return importlib.import_module("spamkern.kernels")
    except ModuleNotFoundError as err:
        if err.name != "spamkern.kernels":
            raise
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not source.is_file():
        raise ModuleNotFoundError(
            "spamkern.kernels is neither installed nor in this checkout", name="spamkern.kernels"
        )
    spec = importlib.util.spec_from_file_location(
        "spamkern.kernels", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["spamkern.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["spamkern.kernels"]
        raise
    return module


def kernel_module(name: str) -> ModuleType:
    """The Triton kernel module ``spamkern.kernels.<name>`` (imported once; importing it
    registers its kernels). The one way to reach the Triton kernels: tests, benchmarks and
    the sparse layers all use it, so each kernel is compiled under one module name."""
    if name not in KERNEL_MODULES:
        raise ValueError(f"unknown kernel module {name!r}; the modules are {KERNEL_MODULES}")
    _kernel_package()
    return importlib.import_module(f"spamkern.kernels.{name}")


def load_kernels() -> ModuleType:
    """The Triton kernel package with every kernel module imported and registered."""
    package = _kernel_package()
    for name in KERNEL_MODULES:
        kernel_module(name)
    return package
