"""Curvature harvested from the training sweep: EF and MC-GGN factors without a refit pass.

During an epoch that ends in a marglik step, forward hooks record every Linear/Conv2d input
``a`` and output; each training step's per-sample output gradients ``g`` then give
A += Σ a aᵀ / S and G += Σ g gᵀ through the same helpers as the refit pass, so the factors
have laplace-torch's Kron layout and scaling (``[G, A]`` per weight, ``[G]`` per bias,
A divided by N):

* EF: ``g`` is the training backward's own output gradient, rescaled from the mean loss of
  the batch to the summed loss (× B; a regression loss also drops its 1/σ² factor);
* MC-GGN: one extra backward of sampled labels to the layer outputs only (no parameter
  gradients are formed).

θ moves during the epoch, so this is a running estimate over the epoch, not the curvature
at the epoch's final θ; with a learning rate of 0 it equals a refit. The summed loss is the
training loss over the epoch. The mean layer inputs E[a] are recorded as the refit records
them (data-free reconstruction lets a pruned layer's bias absorb them). Every trainable
tensor must sit in a Linear, convolution or attention layer (others need per-sample
autograd: use a refit); exact GGN always refits.

:class:`InputFactors` keeps the Kronecker A of layers whose input depends on the data only
(no trainable parameter upstream, e.g. the first layer): computed in the first pass of a
run, reused by every later pass — refits and harvests alike. Valid when the data yield the
same inputs in every pass (no random augmentation, no dropout before those layers); their
eigendecompositions are then computed once per run too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from spamkern.curvature.accumulate import (
    Curvature,
    PassSums,
    _accumulate_conv,
    _accumulate_linear,
    _accumulate_mean,
    _needs,
    _per_call_blocks,
    _Recorder,
    assemble_curvature,
)
from spamkern.curvature.likelihood import pseudo_gradients
from spamkern.curvature.structure import CONVS, ParamBlock
from spamkern.ops.factors import gram_upper
from spamkern.posterior.eigen import keep_eigh

CURVATURE_SOURCES = ("epoch", "refit")
HARVESTABLE = ("ef", "ggn-mc")
# rows of a plain Linear layer's inputs and output gradients kept before one Gram product:
# fewer, larger products run nearer the CPU's matmul peak (measured: -30 % per factor for
# 8 batches of 128 rows at width 256) and the per-batch call overhead goes
_STASH_ROWS = 1024


def check_curvature_source(curvature_source: str, curvature: str, blocks: list[ParamBlock]) -> None:
    """Refuse a harvest that cannot be done exactly as documented."""
    if curvature_source not in CURVATURE_SOURCES:
        raise ValueError(
            f"curvature_source must be one of {CURVATURE_SOURCES}, got {curvature_source!r}"
        )
    if curvature_source == "refit":
        return
    if curvature not in HARVESTABLE:
        raise ValueError(
            f"curvature_source='epoch' harvests {HARVESTABLE} only; curvature={curvature!r} "
            "(exact GGN, C output columns) needs curvature_source='refit'"
        )
    others = [b.name for b in blocks if not b.via_hooks]
    if others:
        raise ValueError(
            "curvature_source='epoch' needs every trainable tensor in a Linear, convolution "
            f"or attention layer; {others} need per-sample autograd: use curvature_source='refit'"
        )


class EpochHarvest:
    """Accumulates EF or MC-GGN curvature from the training steps of one epoch.

    Use as a context manager around the epoch (it installs forward hooks); per step call
    :meth:`before_backward` after the forward and :meth:`after_backward` after the
    training backward, then :meth:`curvature` once the epoch is over.
    """

    def __init__(
        self,
        blocks: list[ParamBlock],
        curvature: str,
        generator: torch.Generator | None = None,
        input_factors: dict[int, torch.Tensor] | None = None,
        likelihood: str = "classification",
    ):
        if curvature not in HARVESTABLE:
            raise ValueError(f"can harvest {HARVESTABLE} only, got {curvature!r}")
        self.blocks, self.curvature_type, self.likelihood = blocks, curvature, likelihood
        self.generator = generator
        self.input_factors = dict(input_factors or {})
        self._given_A = {
            (id(blocks[i].module), site) for i in self.input_factors for site in blocks[i].sites
        }
        param = blocks[0].param
        self.sums = PassSums(loss=torch.zeros((), dtype=param.dtype, device=param.device))
        self._recorder: _Recorder | None = None
        self._stash = _RowStash(self._sum_rows, self._stash_needs, self._stash_mean)
        self._output_grads: list[torch.Tensor | None] = []  # EF: this step's, by call

    def __enter__(self) -> EpochHarvest:
        self._recorder = _Recorder(self.blocks)
        return self

    def __exit__(self, *exc) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def _calls(self):
        if self._recorder is None:
            raise RuntimeError("EpochHarvest must be entered (with ...) before the forward")
        return self._recorder.outputs()

    def before_backward(self, f: torch.Tensor, y: torch.Tensor) -> None:
        """EF: keep the output gradients of the coming backward. MC: backpropagate sampled
        labels to the layer outputs now (the graph is kept for the training backward)."""
        outs = [rec.calls[i][site][1] for rec, i, site in self._calls()]
        if self.curvature_type == "ef":  # a hook keeps each gradient as it passes
            self._output_grads = [None] * len(outs)  # (retain_grad would clone it)
            for k, out in enumerate(outs):
                if out.requires_grad:
                    out.register_hook(partial(_keep, self._output_grads, k))
            return
        V = pseudo_gradients(self.likelihood, self.curvature_type, f, y, self.generator)
        grads = torch.autograd.grad(f, outs, V[:, 0].to(f.dtype), True, allow_unused=True)
        self._accumulate(self._calls(), grads, 1.0)

    def after_backward(self, f: torch.Tensor, batch_loss: torch.Tensor, grad_scale: float) -> None:
        """Count the batch: its summed loss (no σ factor) and, for EF, the output gradients
        of the training loss times ``grad_scale`` (B for a mean loss, B·σ² for regression)."""
        calls = self._calls()
        if self.curvature_type == "ef":
            self._accumulate(calls, self._output_grads, grad_scale)
            self._output_grads = []
        self.sums.count(f, batch_loss.detach())
        self._recorder.clear()

    def _accumulate(self, calls, grads, scale: float) -> None:
        for (rec, i, site), g in zip(calls, grads):
            if g is None:  # this call does not influence the output
                continue
            if len(rec.calls) > 1 and any(b.kind == "diag" for _, b in rec.blocks):
                raise ValueError(
                    f"module {rec.blocks[0][1].module_name!r} is called more than once; its "
                    "exact diagonal needs per-sample autograd: use curvature_source='refit'"
                )
            a, _, positions = rec.calls[i][site]
            own, key = _per_call_blocks(rec, site), (id(rec.module), site)
            if _stashable(rec.module, a, positions, own):
                self._stash.add(key, rec.module, own, a, g, scale)
                continue
            g = (g * scale if scale != 1.0 else g).unsqueeze(0)
            parts = (self.sums.G, self.sums.A, self.sums.diags, key not in self._given_A)
            if isinstance(rec.module, CONVS):
                _accumulate_conv(key, rec.module, a, g, own, *parts)
            else:
                _accumulate_linear(key, a, g, positions, own, *parts)
            _accumulate_mean(rec.module, a, positions, own, self.sums.means)

    def _stash_needs(self, key, own) -> tuple[bool, bool]:
        """(G summed, A summed) for a plain Linear map: A not where it is given."""
        need_G, need_A = _needs(own)
        return need_G, need_A and key not in self._given_A

    def _stash_mean(self, module: nn.Module, own, a: torch.Tensor) -> None:
        _accumulate_mean(module, a, None, own, self.sums.means)

    def _sum_rows(self, key, module: nn.Module, own, a, g, alpha) -> None:
        """Add stacked rows of one plain Linear map (Kronecker blocks only): inputs to its A
        and input mean, output gradients (scaled by ``alpha``) to its G."""
        sums = self.sums
        if g is not None:
            sums.G[key] = gram_upper(g, sums.G.get(key), alpha)
        if a is not None:
            sums.A[key] = gram_upper(a, sums.A.get(key))
            _accumulate_mean(module, a, None, own, sums.means)

    def curvature(self) -> Curvature:
        """The harvested blocks, laid out and scaled like :func:`accumulate_curvature`'s."""
        if self.sums.n_data == 0:
            raise ValueError("the harvested epoch saw no samples")
        self._stash.flush()
        return assemble_curvature(self.blocks, self.sums, self.input_factors)


def _keep(store: list, index: int, grad: torch.Tensor) -> None:
    """Tensor hook: keep the gradient arriving at a layer output (read-only, not copied)."""
    store[index] = grad


def _stashable(module: nn.Module, a: torch.Tensor, positions, own) -> bool:
    """A Linear layer on (batch, features) inputs with Kronecker blocks only: its sums over
    rows can wait for more rows (diagonal blocks need per-sample products at once)."""
    return (
        type(module) is nn.Linear
        and a.ndim == 2
        and positions is None
        and all(block.kind == "kron" for _, block in own)
    )


class _RowBuffer:
    """Rows of one matrix copied in batch by batch (the copy a concatenation would make,
    into storage of its own, so a data loader that reuses its batch tensors cannot change
    them), each batch with its scale."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.rows = 0
        self.spans: list[tuple[int, int, float]] = []

    def fits(self, n: int) -> bool:
        return self.data is None or self.rows + n <= self.data.shape[0]

    def append(self, x: torch.Tensor, scale: float = 1.0) -> None:
        if self.data is None:
            self.data = x.new_empty(max(_STASH_ROWS, x.shape[0]), x.shape[1])
        stop = self.rows + x.shape[0]
        self.data[self.rows : stop].copy_(x)
        self.spans.append((self.rows, stop, scale))
        self.rows = stop

    def take(self) -> tuple[torch.Tensor, float]:
        """The rows so far and the Gram product's alpha: scale² when every batch has the
        same scale (EF: × B), else 1 with each batch's rows rescaled (a shorter last batch)."""
        rows, scales = self.data[: self.rows], [scale for *_, scale in self.spans]
        alpha = scales[0] ** 2
        if any(scale != scales[0] for scale in scales):
            for start, stop, scale in self.spans:
                rows[start:stop].mul_(scale)
            alpha = 1.0
        self.rows, self.spans = 0, []
        return rows, alpha


@dataclass
class _Pending:
    """One Linear map's rows waiting for their Gram products: inputs when its A is still
    to be summed, output gradients when its G is."""

    module: nn.Module
    blocks: list
    inputs: _RowBuffer | None
    grads: _RowBuffer | None


class _RowStash:
    """Inputs and output gradients of plain Linear maps, stacked over batches and handed
    to ``sum_rows(key, module, blocks, a, g, alpha)`` once ``_STASH_ROWS`` rows are in (and
    at :meth:`flush`); ``a`` or ``g`` is None where that factor is not summed. Every sum
    taken of them is a sum over rows, so the result is the per-batch one up to the order
    of floating-point additions. ``needs(key, blocks)`` says which factors a map sums;
    ``add_mean(module, blocks, a)`` takes the input mean of a batch whose inputs are not
    kept."""

    def __init__(self, sum_rows, needs, add_mean):
        self.sum_rows, self.needs, self.add_mean = sum_rows, needs, add_mean
        self.pending: dict = {}  # key -> _Pending

    def add(self, key, module: nn.Module, own, a: torch.Tensor, g: torch.Tensor, scale) -> None:
        entry = self.pending.get(key)
        if entry is None:
            need_G, need_A = self.needs(key, own)
            inputs, grads = (_RowBuffer() if need_A else None), (_RowBuffer() if need_G else None)
            entry = self.pending[key] = _Pending(module, own, inputs, grads)
        if entry.inputs is None:
            self.add_mean(module, own, a)
        buffers = [(buf, x) for buf, x in ((entry.inputs, a), (entry.grads, g)) if buf]
        if not all(buf.fits(x.shape[0]) for buf, x in buffers):
            self._flush(key)
        for buf, x in buffers:
            buf.append(x, scale if buf is entry.grads else 1.0)
        if any(buf.rows >= _STASH_ROWS for buf, _ in buffers):
            self._flush(key)

    def _flush(self, key) -> None:
        entry = self.pending[key]
        a = entry.inputs.take()[0] if entry.inputs is not None and entry.inputs.rows else None
        g, alpha = (None, 1.0)
        if entry.grads is not None and entry.grads.rows:
            g, alpha = entry.grads.take()
        if a is not None or g is not None:
            self.sum_rows(key, entry.module, entry.blocks, a, g, alpha)

    def flush(self) -> None:
        for key in self.pending:
            self._flush(key)


class InputFactors:
    """Kronecker A factors of layers whose input depends on the data only, kept per run.

    ``enabled=False`` turns the reuse off (data that differ between passes: random
    augmentation, dropout before the first layer). Single process only: under
    torch.distributed every pass accumulates its own.
    """

    def __init__(self, blocks: list[ParamBlock], enabled: bool = True):
        self.blocks, self.enabled = blocks, enabled
        self.indices: list[int] | None = None  # found on the first pass
        self.factors: dict[int, torch.Tensor] = {}

    @property
    def needs_detection(self) -> bool:
        """Whether :meth:`detect` still has to look at a forward."""
        return self.enabled and self.indices is None

    def given(self) -> dict[int, torch.Tensor]:
        """The factors the next pass can take as given."""
        return dict(self.factors) if self.enabled else {}

    def detect(self, model: nn.Module, x: Any) -> list[int]:
        """Kronecker weight blocks whose layer input needs no gradient in a forward of ``x``."""
        if self.indices is not None or not self.enabled:
            return self.indices or []
        kron = [  # single-map weights (Linear/conv); attention projections are left out
            (i, b)
            for i, b in enumerate(self.blocks)
            if b.kind == "kron" and b.role == "weight" and b.sites == ("main",)
        ]
        data_only = {i: True for i, _ in kron}

        def hook_for(index: int):
            def hook(module, inputs, output):
                data_only[index] &= not inputs[0].requires_grad

            return hook

        handles = [b.module.register_forward_hook(hook_for(i)) for i, b in kron]
        try:
            with torch.enable_grad():
                model(x)
        finally:
            for handle in handles:
                handle.remove()
        self.indices = sorted(i for i, flag in data_only.items() if flag)
        return self.indices

    def update(self, result: Curvature) -> None:
        """Keep the data-only A factors of a finished pass (the first one computes them)."""
        if not self.enabled or self.indices is None:
            return
        for index in self.indices:
            if index not in self.factors:
                self.factors[index] = keep_eigh(result.factors[index][1])

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "factors": {i: A.clone() for i, A in self.factors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = state["indices"]
        self.factors = {i: keep_eigh(A) for i, A in state["factors"].items()}
