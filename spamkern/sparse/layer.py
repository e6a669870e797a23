"""``BlockSparseLinear``: a pruned nn.Linear that runs block-sparse when that is faster.

The weight lives as BSR buffers (spamkern/sparse/format.py), so ``.to(device)`` and
``.half()`` move and cast it like any module. ``mode``: ``"auto"`` decides per input shape
and dtype from measured timings (spamkern/sparse/decision.py), ``"sparse"`` and ``"dense"``
force a path. ``last_choice`` says what the latest call ran and why. Inference only: the
compiled kernels have no backward. Under ``torch.compile`` nothing is measured while
tracing: run one eager call per input shape first so the measured choice is in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spamkern import dispatch
from spamkern.sparse.decision import Choice, decide, input_rows
from spamkern.sparse.format import BlockSparseWeight, check_block
from spamkern.sparse.ops import bsr_linear

MODES = ("auto", "sparse", "dense")


class BlockSparseLinear(nn.Module):
    """y = x Wᵀ + b with W stored as kept blocks only (zero blocks dropped)."""

    def __init__(
        self,
        weight: BlockSparseWeight,
        bias: torch.Tensor | None = None,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.block = weight.block
        self.mode = mode
        self.register_buffer("row_ptr", weight.row_ptr)
        self.register_buffer("col_idx", weight.col_idx)
        self.register_buffer("blocks_t", weight.blocks_t)
        self.register_buffer("row_order", weight.row_order)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.last_choice: Choice | None = None
        self._choices: dict[tuple, Choice] = {}
        self._dense: tuple[tuple, torch.Tensor] | None = None
        self._impls: dict[str, object] = {}
        dispatch.available_backends("bsr_linear")  # import the kernels now, not while tracing

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        block: tuple[int, int] | int = (64, 64),
        mask: torch.Tensor | None = None,
        mode: str = "auto",
    ) -> BlockSparseLinear:
        """Pack ``linear``'s weight, keeping blocks by ``mask`` (element or block mask) or,
        without one, the blocks that hold any non-zero weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        weight = BlockSparseWeight.from_dense(linear.weight, check_block(block), mask)
        return cls(weight, linear.bias, mode=mode)

    @property
    def weight_bsr(self) -> BlockSparseWeight:
        return BlockSparseWeight(
            (self.out_features, self.in_features),
            self.block,
            self.row_ptr,
            self.col_idx,
            self.blocks_t,
            self.row_order,
        )

    @property
    def density(self) -> float:
        return self.weight_bsr.density

    def dense_weight(self) -> torch.Tensor:
        """The dense (masked) weight, built once per device/dtype and kept for the dense path."""
        key = (self.blocks_t.data_ptr(), self.blocks_t.dtype, self.blocks_t.device)
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.weight_bsr.to_dense())
        return self._dense[1]

    def _candidates(self, x2: torch.Tensor) -> list[str]:
        """Sparse backends to choose among: the one ``SPAMKERN_BACKEND`` names, else every
        fast backend that can run on x (the torch reference only when there is none)."""
        if dispatch.requested_backend() != "auto":
            return [dispatch.select_backend("bsr_linear", x2, self.blocks_t)]
        order = ("cuda", "triton") if x2.device.type == "cuda" else ("cpp",)
        found = []
        for name in order:
            try:
                dispatch.select_impl("bsr_linear", x2, self.blocks_t, backend=name)
            except ValueError:
                continue
            found.append(name)
        return found or ["torch"]

    def _choose(self, x2: torch.Tensor) -> Choice:
        key = (self.mode, x2.shape[0], x2.dtype, x2.device, dispatch.requested_backend())
        choice = self._choices.get(key)
        if choice is not None:
            return choice
        if self.mode == "dense":
            choice = Choice("dense", "dense", "mode='dense'")
        elif self.mode == "sparse":
            choice = Choice("sparse", self._candidates(x2)[0], "mode='sparse'")
        else:
            candidates = self._candidates(x2)
            w, b = self.weight_bsr, self.bias
            choice = decide(
                op="bsr_linear",
                x=x2,
                n=self.out_features,
                block=self.block,
                density=w.density,
                candidates={
                    name: (lambda name=name: bsr_linear(x2, w, b, backend=name))
                    for name in candidates
                },
                run_dense=lambda: F.linear(x2, self.dense_weight(), b),
            )
            if choice.path == "sparse":
                self._dense = None  # the dense copy is not needed: free it
        if not torch.compiler.is_compiling():  # a traced call measured nothing: ask again
            self._choices[key] = choice
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = input_rows(x, self.in_features)
        choice = self._choose(x2)
        self.last_choice = choice
        if choice.path == "dense":
            y = F.linear(x2, self.dense_weight(), self.bias)
        else:
            # the backend was validated for this shape and dtype when it was chosen: call it
            # directly (a decode-sized GPU kernel takes microseconds; dispatch costs some too)
            fn = self._impls.get(choice.backend)
            if fn is None:
                fn = dispatch.select_impl("bsr_linear", x2, self.blocks_t, backend=choice.backend)
                self._impls[choice.backend] = fn
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            y = fn(
                x2, self.row_ptr, self.col_idx, self.blocks_t, self.row_order, self.bias,
                self.out_features,
            )  # fmt: skip
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, density={self.density:.3f}, bias={self.bias is not None}, "
            f"mode={self.mode!r}"
        )
