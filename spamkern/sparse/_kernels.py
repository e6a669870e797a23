"""Finding the Triton block-sparse module, installed (spamkern.kernels) or in a checkout.

setup.py installs the top-level ``kernels/`` folder as ``spamkern.kernels``; in a source
checkout the same files are importable as ``kernels`` from the repository root.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_NAMES = ("spamkern.kernels.block_sparse", "kernels.block_sparse")


def triton_module() -> ModuleType | None:
    """The imported Triton kernel module, or None when triton is missing."""
    for name in _NAMES:
        if name in sys.modules:
            return sys.modules[name]
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    for name in _NAMES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):
                raise
    return None
