"""Hyperstep log det Σ_blocks Σ_pq log(s·λ1_p·λ2_q + δ_pq) and its gradient, in one launch.

The eigenvalues are packed once per fit (:class:`TritonEigLogdetPlan`); every call packs the
current δ blocks into one buffer and runs a single kernel over all blocks that writes the
value and, when δ or s require grad, the gradients ∂/∂δ_pq = 1/(s·λ1λ2 + δ) (summed over
broadcast dimensions, so a layerwise δ gets one number per block) and
∂/∂s = Σ λ1λ2/(s·λ1λ2 + δ). Backward is then a multiplication by the incoming gradient — a
hyperstep costs the same few launches whether the model has 3 layers or 300. Sums are
accumulated in float64 (atomically across programs, so the last bits may vary on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spamkern.dispatch import register_impl

from ._util import device_scalar, interpreting

_META = 8  # l1 offset, l2 offset, q, size, delta offset, delta stride p, stride q, scalar?


@triton.jit
def _eig_logdet_kernel(
    l1_ptr, l2_ptr, delta_ptr, scale_ptr, value_ptr, gdelta_ptr, gscale_ptr,
    prog_block_ptr, prog_start_ptr, meta_ptr,
    NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    meta = meta_ptr + tl.load(prog_block_ptr + pid) * 8
    q = tl.load(meta + 2)
    size = tl.load(meta + 3)
    d_off = tl.load(meta + 4)
    local = tl.load(prog_start_ptr + pid) + tl.arange(0, BLOCK)
    mask = local < size
    row = local // q
    col = local % q
    lam = tl.load(l1_ptr + tl.load(meta) + row, mask=mask, other=1.0) * tl.load(
        l2_ptr + tl.load(meta + 1) + col, mask=mask, other=1.0
    )
    d_idx = d_off + row * tl.load(meta + 5) + col * tl.load(meta + 6)
    delta = tl.load(delta_ptr + d_idx, mask=mask, other=1.0)
    x = tl.load(scale_ptr) * lam + delta
    tl.atomic_add(value_ptr, tl.sum(tl.where(mask, tl.log(x), 0.0).to(tl.float64), 0))
    if NEED_GRAD:
        inv = tl.where(mask, 1.0 / x, 0.0).to(tl.float64)
        tl.atomic_add(gscale_ptr, tl.sum(lam.to(tl.float64) * inv, 0))
        if tl.load(meta + 7) != 0:
            tl.atomic_add(gdelta_ptr + d_off, tl.sum(inv, 0))
        else:
            tl.atomic_add(gdelta_ptr + d_idx, inv, mask=mask)


def _block_size() -> int:
    return 1 << 16 if interpreting() else 1024


def _eig_logdet_launch(
    l1: torch.Tensor,
    l2: torch.Tensor,
    delta: torch.Tensor,
    scale: torch.Tensor,
    prog_block: torch.Tensor,
    prog_start: torch.Tensor,
    meta: torch.Tensor,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, ∂/∂delta (float64, packed), ∂/∂scale (float64, (1,))) of the packed log det."""
    value = torch.zeros(1, dtype=torch.float64, device=l1.device)
    n_grad = delta.numel() if need_grad else 0
    gdelta = torch.zeros(n_grad, dtype=torch.float64, device=l1.device)
    gscale = torch.zeros(1 if need_grad else 0, dtype=torch.float64, device=l1.device)
    if prog_block.numel():
        _eig_logdet_kernel[(prog_block.numel(),)](
            l1, l2, delta, scale, value, gdelta, gscale, prog_block, prog_start, meta,
            NEED_GRAD=need_grad, BLOCK=_block_size(),
        )  # fmt: skip
    return value.to(l1.dtype).reshape(()), gdelta, gscale


@torch.library.custom_op("spamkern::triton_eig_logdet", mutates_args=())
def triton_eig_logdet(
    l1: torch.Tensor,
    l2: torch.Tensor,
    delta: torch.Tensor,
    scale: torch.Tensor,
    prog_block: torch.Tensor,
    prog_start: torch.Tensor,
    meta: torch.Tensor,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom-op form of the packed log det, differentiable (what ``torch.compile`` traces)."""
    return _eig_logdet_launch(l1, l2, delta, scale, prog_block, prog_start, meta, need_grad)


@triton_eig_logdet.register_fake
def _(l1, l2, delta, scale, prog_block, prog_start, meta, need_grad):
    n_grad = delta.numel() if need_grad else 0
    return (
        l1.new_empty(()),
        delta.new_empty(n_grad, dtype=torch.float64),
        delta.new_empty(1 if need_grad else 0, dtype=torch.float64),
    )


def _setup_context(ctx, inputs, output):
    _, gdelta, gscale = output
    ctx.save_for_backward(gdelta, gscale)
    ctx.delta_dtype = inputs[2].dtype
    ctx.scale_dtype = inputs[3].dtype


def _backward(ctx, grad_value, _grad_gdelta, _grad_gscale):
    gdelta, gscale = ctx.saved_tensors
    if gdelta.numel() == 0 and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
        raise RuntimeError("triton_eig_logdet was called with need_grad=False")
    g_delta = (grad_value * gdelta).to(ctx.delta_dtype) if ctx.needs_input_grad[2] else None
    g_scale = (grad_value * gscale).to(ctx.scale_dtype) if ctx.needs_input_grad[3] else None
    return None, None, g_delta, g_scale, None, None, None, None


triton_eig_logdet.register_autograd(_backward, setup_context=_setup_context)


class _EagerEigLogdet(torch.autograd.Function):
    """The same forward/backward without the custom-op wrapper, for eager hypersteps."""

    @staticmethod
    def forward(ctx, delta, scale, l1, l2, prog_block, prog_start, meta, need_grad):
        value, gdelta, gscale = _eig_logdet_launch(
            l1, l2, delta, scale, prog_block, prog_start, meta, need_grad
        )
        ctx.save_for_backward(gdelta, gscale)
        ctx.dtypes = (delta.dtype, scale.dtype)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        gdelta, gscale = ctx.saved_tensors
        g_delta = (grad_value * gdelta).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        g_scale = (grad_value * gscale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return g_delta, g_scale, None, None, None, None, None, None


class TritonEigLogdetPlan:
    """Packed eigenvalues of many blocks; ``plan(deltas, scale)`` is one kernel launch."""

    def __init__(self, l1: list[torch.Tensor], l2: list[torch.Tensor]):
        if len(l1) != len(l2):
            raise ValueError(f"l1 and l2 must list the same blocks, got {len(l1)} and {len(l2)}")
        if not l1:
            raise ValueError("the plan needs at least one block")
        self.dtype = torch.promote_types(l1[0].dtype, torch.float32)
        self.device = l1[0].device
        self.shapes = [(a.numel(), b.numel()) for a, b in zip(l1, l2)]
        self.l1 = torch.cat([a.detach().reshape(-1).to(self.dtype) for a in l1])
        self.l2 = torch.cat([b.detach().reshape(-1).to(self.dtype) for b in l2])
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tables_for(self, delta_shapes: tuple[tuple[int, ...], ...]):
        """Program table and per-block metadata for these δ shapes (built once per shape set)."""
        if delta_shapes in self._tables:
            return self._tables[delta_shapes]
        block = _block_size()
        prog_block, prog_start, meta = [], [], []
        l1_off = l2_off = d_off = 0
        for i, ((p, q), shape) in enumerate(zip(self.shapes, delta_shapes)):
            try:
                strides = torch.empty(shape, device="meta").expand(p, q).stride()
            except RuntimeError as err:
                raise ValueError(
                    f"delta block {i} has shape {shape}, which does not broadcast to its "
                    f"eigenvalue grid ({p}, {q})"
                ) from err
            numel = 1
            for s in shape:
                numel *= s
            meta.append([l1_off, l2_off, q, p * q, d_off, strides[0], strides[1], int(numel == 1)])
            for start in range(0, p * q, block):
                prog_block.append(i)
                prog_start.append(start)
            l1_off, l2_off, d_off = l1_off + p, l2_off + q, d_off + numel
        tables = tuple(
            torch.tensor(v, dtype=torch.int64, device=self.device)
            for v in (prog_block, prog_start, meta)
        )
        self._tables[delta_shapes] = tables
        return tables

    def __call__(self, delta: list[torch.Tensor], scale: torch.Tensor | float) -> torch.Tensor:
        if len(delta) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} delta blocks, got {len(delta)}")
        delta = [torch.as_tensor(d, dtype=self.dtype, device=self.device) for d in delta]
        prog_block, prog_start, meta = self._tables_for(tuple(tuple(d.shape) for d in delta))
        packed = torch.cat([d.reshape(-1).to(self.dtype) for d in delta])
        if isinstance(scale, torch.Tensor):
            scale_t = scale.reshape(1).to(self.dtype)
        else:
            scale_t = device_scalar(scale, self.dtype, self.device)
        need_grad = torch.is_grad_enabled() and (packed.requires_grad or scale_t.requires_grad)
        tables = (prog_block, prog_start, meta)
        if torch.compiler.is_compiling():
            value, _, _ = triton_eig_logdet(self.l1, self.l2, packed, scale_t, *tables, need_grad)
            return value
        return _EagerEigLogdet.apply(packed, scale_t, self.l1, self.l2, *tables, need_grad)


def _supported(*tensors) -> bool:
    return all(t.dtype in (torch.float32, torch.float64) for t in tensors)


@register_impl("eig_logdet_plan", "triton", supports=_supported)
def eig_logdet_plan_triton(l1: list[torch.Tensor], l2: list[torch.Tensor]) -> TritonEigLogdetPlan:
    return TritonEigLogdetPlan(l1, l2)


@register_impl("eig_logdet", "triton", supports=_supported)
def eig_logdet_triton(
    l1: list[torch.Tensor],
    l2: list[torch.Tensor],
    delta: list[torch.Tensor],
    scale: torch.Tensor | float,
) -> torch.Tensor:
    return TritonEigLogdetPlan(l1, l2)(delta, scale)
