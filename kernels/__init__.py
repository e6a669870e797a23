"""Triton kernels of spamkern (installed as ``spamkern.kernels``).

Importing this package registers every kernel with :mod:`spamkern.dispatch`; it needs
``triton``. Each submodule is one operation: kernels, launcher, registration.
"""

import importlib

try:
    import triton  # noqa: F401
except ImportError:  # the reference implementations still work without triton
    HAS_TRITON = False
else:
    HAS_TRITON = True
    for _name in ("factors", "opd", "select", "logdet", "block_sparse"):
        importlib.import_module(f"{__name__}.{_name}")
