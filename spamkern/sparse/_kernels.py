"""The Triton block-sparse module, reached the one way every Triton kernel is reached
(:func:`spamkern.dispatch.kernel_module`), or None when triton is not installed."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from spamkern import dispatch


def triton_module() -> ModuleType | None:
    """``spamkern.kernels.block_sparse`` (imported and registered), or None without triton.

    Any other failure to import it is an error here: the caller asked for the kernels."""
    if importlib.util.find_spec("triton") is None:
        return None
    return dispatch.kernel_module("block_sparse")
