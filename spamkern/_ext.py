"""Loads the compiled extension ``spamkern._C`` and registers its kernels for dispatch.

The kernels are torch custom ops (``torch.ops.spamkern.*``) with one implementation per
dispatch key (CPU, CUDA) registered in C++, so torch routes each call to the kernel of the
tensors' device. If the extension is missing or fails to load, spamkern keeps working on its
torch and Triton implementations; one warning says why and how to rebuild (never one per
call); ``make test`` builds it as a requirement.
Importing this module also gives the extension's custom ops fake implementations, so they
trace under ``torch.compile``.
"""

from __future__ import annotations

import warnings

import torch

from spamkern.dispatch import register_impl

REBUILD_HINT = (
    "rebuild it with `python setup.py build_ext --inplace` in the source tree, or reinstall "
    "with `pip install --no-build-isolation .` (needs a C++17 compiler with OpenMP)"
)

try:
    from spamkern import _C  # noqa: N812
except ImportError as err:  # not built, or built against another torch
    _C = None
    LOAD_ERROR: str | None = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"spamkern._C could not be loaded ({LOAD_ERROR}); the C++/CUDA kernels are off and "
        f"the torch/Triton versions run instead. To get them, {REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    LOAD_ERROR = None

AVAILABLE = _C is not None
HAS_CUDA_KERNELS = bool(AVAILABLE and _C.has_cuda())


def cpu_isa() -> str | None:
    """Vector instruction set the CPU kernel uses here ("avx512", "avx2", "generic")."""
    return _C.cpu_isa() if AVAILABLE else None


if AVAILABLE:

    @torch.library.register_fake("spamkern::bsr_linear")
    def _bsr_linear_fake(x, row_ptr, col_idx, blocks, row_order, bias, out_features):
        return x.new_empty(x.shape[0], out_features)

    _CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    def _cpp_supports(x: torch.Tensor, blocks_t: torch.Tensor | None = None, *rest) -> bool:
        return x.dtype in _CPP_DTYPES and (blocks_t is None or blocks_t.dtype == x.dtype)

    def bsr_linear_compiled(x, row_ptr, col_idx, blocks_t, row_order, bias, out_features):
        """``torch.ops.spamkern.bsr_linear``: torch's dispatcher runs the kernel registered
        for the tensors' device (csrc/cpu on CPU tensors, csrc/cuda on CUDA tensors)."""
        return torch.ops.spamkern.bsr_linear(
            x, row_ptr, col_idx, blocks_t, row_order, bias, out_features
        )

    # one op, two dispatch keys: the names only tell the backend switch which device it is
    register_impl("bsr_linear", "cpp", supports=_cpp_supports)(bsr_linear_compiled)

    if HAS_CUDA_KERNELS:

        def _cuda_supports(x: torch.Tensor, blocks_t: torch.Tensor | None = None, *rest) -> bool:
            if x.dtype not in (torch.float16, torch.bfloat16):
                return False
            if blocks_t is None:
                return True
            return (
                blocks_t.dtype == x.dtype
                and blocks_t.shape[2] in (32, 64, 128)
                and x.shape[-1] % 8 == 0
            )

        register_impl("bsr_linear", "cuda", supports=_cuda_supports)(bsr_linear_compiled)


if AVAILABLE:
    _PARAMETERWISE_DTYPES = (torch.float32, torch.float64)

    def _parameterwise_supports(x: torch.Tensor, *rest) -> bool:
        return x.dtype in _PARAMETERWISE_DTYPES

    @torch.library.register_fake("spamkern::projected_precision")
    def _projected_precision_fake(projected, products, scale, factor, side):
        lead = projected.shape[:-2]
        along = {1: (*lead, projected.shape[-2]), 2: (*lead, projected.shape[-1])}.get(side, (0,))
        return (
            torch.empty_like(projected),
            torch.empty_like(projected),
            projected.new_empty((), dtype=torch.float64),
            projected.new_empty(along),
        )

    @torch.library.register_fake("spamkern::parameterwise_gradient")
    def _parameterwise_gradient_fake(inverse, squares, delta, log_delta, factor, rows):
        cols = inverse.numel() // rows
        return (
            *(torch.empty_like(inverse) for _ in range(3)),
            inverse.new_empty(rows),
            inverse.new_empty(cols),
            inverse.new_empty(2, dtype=torch.float64),
        )

    @torch.library.register_fake("spamkern::shift_sums")
    def _shift_sums_fake(projected, products, scale, factor):
        return projected.new_empty(2, dtype=torch.float64)

    @torch.library.register_fake("spamkern::cholesky_lower")
    def _cholesky_lower_fake(matrix):
        return torch.empty_like(matrix), matrix.new_empty((), dtype=torch.int32)

    # the CPU kernels of spamkern.ops.parameterwise (csrc/cpu/parameterwise_terms.cpp) and
    # spamkern.ops.cholesky (csrc/cpu/cholesky.cpp)
    for _op in ("projected_precision", "parameterwise_gradient", "shift_sums", "cholesky_lower"):
        register_impl(_op, "cpp", supports=_parameterwise_supports)(
            getattr(torch.ops.spamkern, _op)
        )
