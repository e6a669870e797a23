"""Small launch helpers shared by the Triton kernels (no kernels here).

Programs are sized differently on a GPU and under ``TRITON_INTERPRET=1``: the interpreter
runs every program one after another in Python, so there we prefer few, large programs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (tests) rather than on a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors of ``device`` (1 for the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float accumulates in float32."""
    if dtype not in TORCH_TO_TL:
        raise TypeError(
            f"expected a floating tensor (float16/bfloat16/float32/float64), got {dtype}"
        )
    return torch.float64 if dtype == torch.float64 else torch.float32


DOT_PRECISIONS = ("tf32x3", "ieee", "tf32")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` operands.

    float32 products default to ``tf32x3`` on a GPU: three TF32 tensor-core products per
    tile (hi·hi + hi·lo + lo·hi), relative error ~1e-6 — float32 accuracy at tensor-core
    speed. ``torch.backends.cuda.matmul.allow_tf32 = True`` selects plain TF32 (~1e-3, 3×
    faster); ``SPAMKERN_FP32_DOT=ieee|tf32x3|tf32`` overrides both. The interpreter always
    computes IEEE products. Other dtypes ignore the setting (fp16/bf16 use tensor cores with
    float32 accumulation, float64 is exact).
    """
    if dtype != torch.float32 or interpreting():
        return "ieee"
    forced = os.environ.get("SPAMKERN_FP32_DOT", "").strip().lower()
    if forced:
        if forced not in DOT_PRECISIONS:
            raise ValueError(f"SPAMKERN_FP32_DOT={forced!r} is not one of {DOT_PRECISIONS}")
        return forced
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


_SCALAR_CACHE: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def device_scalar(value: float | torch.Tensor, dtype: torch.dtype, device: torch.device):
    """``value`` as a (1,) tensor on ``device`` (a Python float kernel argument is only fp32).

    Float values are cached, so repeated calls with the same constant copy nothing.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(1).to(device=device, dtype=dtype)
    key = (float(value), dtype, device)
    if key not in _SCALAR_CACHE:
        if len(_SCALAR_CACHE) > 256:
            _SCALAR_CACHE.clear()
        _SCALAR_CACHE[key] = torch.full((1,), float(value), dtype=dtype, device=device)
    return _SCALAR_CACHE[key]
