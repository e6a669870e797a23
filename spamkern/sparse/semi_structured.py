"""2:4 ("semi-structured") sparse Linear: sparse tensor cores where they pay, dense otherwise.

Within every group of 4 consecutive input weights of an output row at most 2 are kept.
On Ampere/Hopper GPUs with fp16/bf16 the kept half is compressed for cuSPARSELt
(``torch._cslt_compress``) and multiplied with the algorithm its search picks for the shape;
cuSPARSELt loses to dense cuBLAS on mid-sized shapes (0.4× at 4096³ on an H200), so the
layer measures both paths per input shape (spamkern/sparse/decision.py) and runs the faster.
On the CPU, in float32, or when cuSPARSELt refuses the shape, the dense masked weight runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spamkern.sparse.decision import Choice, decide, input_rows

MODES = ("auto", "sparse", "dense")


def is_2to4(mask: torch.Tensor) -> bool:
    """Whether a (out, in) bool mask keeps at most 2 of every 4 consecutive inputs per row."""
    if mask.ndim != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all())


def _cslt_usable(weight: torch.Tensor) -> bool:
    return (
        weight.is_cuda
        and weight.dtype in (torch.float16, torch.bfloat16)
        and hasattr(torch, "_cslt_compress")
        and torch.cuda.get_device_capability(weight.device) >= (8, 0)
    )


class SemiStructuredLinear(nn.Module):
    """y = x Wᵀ + b for a 2:4-masked W; says in ``last_choice`` which path ran and why."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not is_2to4(weight != 0):
            raise ValueError(
                "weight is not 2:4 sparse: each group of 4 consecutive inputs of a row may keep "
                f"at most 2 non-zeros, and in_features ({weight.shape[-1]}) must divide by 4"
            )
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.mode = mode
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.last_choice: Choice | None = None
        self._packed: tuple[tuple, torch.Tensor | None, str] | None = None
        self._alg: dict[int, int] = {}
        self._choices: dict[tuple, Choice] = {}

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, mode: str = "auto"
    ) -> SemiStructuredLinear:
        """Apply ``mask`` (bool, weight-shaped, 2:4) to ``linear``'s weight and wrap it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != weight.shape:
                raise ValueError(
                    f"mask must be a bool tensor of shape {tuple(weight.shape)}, got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
            if not is_2to4(mask):
                raise ValueError("mask is not 2:4: at most 2 kept in each group of 4 inputs")
            weight = weight * mask.to(weight.device)
        return cls(weight, linear.bias, mode=mode)

    def _compressed(self) -> tuple[torch.Tensor | None, str]:
        key = (self.weight.data_ptr(), self.weight.dtype, self.weight.device)
        if self._packed is None or self._packed[0] != key:
            packed, why = (
                None,
                "cuSPARSELt needs fp16/bf16 on a CUDA GPU of compute capability ≥ 8.0",
            )
            if _cslt_usable(self.weight):
                try:
                    packed, why = torch._cslt_compress(self.weight), "cuSPARSELt"
                except RuntimeError as err:
                    why = f"cuSPARSELt refused the weight: {err}"
            self._packed = (key, packed, why)
        return self._packed[1], self._packed[2]

    def _sparse(self, x2: torch.Tensor) -> torch.Tensor:
        packed, _ = self._compressed()
        m = x2.shape[0]
        if m not in self._alg:
            self._alg[m] = torch._cslt_sparse_mm_search(
                packed, x2.t(), bias=self.bias, transpose_result=True
            )
        y = torch._cslt_sparse_mm(
            packed, x2.t(), bias=self.bias, transpose_result=True, alg_id=self._alg[m]
        )
        return y if y.shape == (m, self.out_features) else y.t()

    def _choose(self, x2: torch.Tensor) -> Choice:
        if self.mode == "dense":
            return Choice("dense", "dense", "mode='dense'")
        packed, why = self._compressed()
        if packed is None or x2.dtype != self.weight.dtype:
            return Choice("dense", "dense", f"dense fallback: {why}")
        key = (x2.shape[0], x2.dtype, x2.device)
        choice = self._choices.get(key)
        if choice is None:
            try:
                ref = F.linear(x2, self.weight, self.bias)
                err = (self._sparse(x2) - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
                if not bool(err < 5e-2):
                    raise RuntimeError(f"cuSPARSELt result differs from dense by {float(err):.3g}")
            except RuntimeError as err:
                choice = Choice("dense", "dense", f"dense fallback: {err}")
            else:
                if self.mode == "sparse":
                    choice = Choice("sparse", "cusparselt", "mode='sparse'")
                else:
                    choice = decide(
                        op="semi24_linear",
                        x=x2,
                        n=self.out_features,
                        block=(2, 4),
                        density=0.5,
                        candidates={"cusparselt": lambda: self._sparse(x2)},
                        run_dense=lambda: F.linear(x2, self.weight, self.bias),
                    )
            self._choices[key] = choice
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = input_rows(x, self.in_features)
        choice = self._choose(x2)
        self.last_choice = choice
        if choice.path == "sparse":
            y = self._sparse(x2.contiguous())
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern=2:4, "
            f"bias={self.bias is not None}, mode={self.mode!r}"
        )
