"""One pass over the data that accumulates every curvature block.

Per batch: one forward with hooks that record each Linear/Conv2d input and output, then one
backward of the (B, K, C) pseudo-gradients to those outputs only (no weight gradients are
formed; exact GGN's K = C columns go through a single batched backward). From inputs a and
output gradients g:

* Kronecker blocks: A += Σ a aᵀ / S and G += Σ g gᵀ (S = weight-sharing positions, the
  "expand" convention); A is divided by N at the end — laplace-torch's scaling;
* exact diagonal blocks of Linear/Conv2d: Σ_{n,k} (per-sample gradient)² formed from a and g;
* any other tensor: exact per-sample, per-column gradients through ``torch.func``.

Every batch counts; N is the number of samples actually seen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from spamkern.curvature.likelihood import (
    check_curvature,
    check_label_range,
    check_likelihood,
    check_targets,
    pseudo_gradients,
    summed_loss,
)
from spamkern.curvature.structure import ParamBlock
from spamkern.data.batches import TensorBatches, split_batch
from spamkern.ops import conv_patch_gram, gram

# per-sample gradient tensors are formed in chunks of at most this many elements
_CHUNK_ELEMENTS = 1 << 26


@dataclass
class Curvature:
    """Accumulated curvature of one fit (unscaled: no temperature, no 1/σ²)."""

    blocks: list[ParamBlock]
    loss: torch.Tensor  # Σ_n ℓ_n over the whole data set
    n_data: int
    n_outputs: int
    factors: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # kron: [G, A] / [G]
    diags: dict[int, torch.Tensor] = field(default_factory=dict)  # diag: shaped like the param
    # kron weights: E[a], the mean layer input in A's layout (lets a pruned layer's bias
    # absorb the input mean when its survivors are re-solved without data)
    input_means: dict[int, torch.Tensor] = field(default_factory=dict)

    def block_factors(self) -> list[list[torch.Tensor] | torch.Tensor]:
        """Per block, in parameter order: its Kronecker factors or its diagonal."""
        return [
            self.factors[i] if i in self.factors else self.diags[i] for i in range(len(self.blocks))
        ]


class _ModuleRecord:
    """Inputs and outputs of every call of one hooked module during a forward."""

    def __init__(self, module: nn.Module, blocks: list[tuple[int, ParamBlock]]):
        self.module = module
        self.blocks = blocks
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()


class _Recorder:
    """Forward hooks on the Linear/Conv2d modules whose parameters need curvature."""

    def __init__(self, blocks: list[ParamBlock]):
        self.records: dict[int, _ModuleRecord] = {}
        for index, block in enumerate(blocks):
            if block.via_hooks:
                key = id(block.module)
                if key not in self.records:
                    self.records[key] = _ModuleRecord(block.module, [])
                self.records[key].blocks.append((index, block))
        self.active = True
        self._handles = [
            rec.module.register_forward_hook(self._hook(rec)) for rec in self.records.values()
        ]

    def _hook(self, record: _ModuleRecord):
        def hook(module, inputs, output):
            if self.active:
                record.inputs.append(inputs[0].detach())
                record.outputs.append(output)

        return hook

    def outputs(self) -> list[tuple[_ModuleRecord, int]]:
        return [(rec, i) for rec in self.records.values() for i in range(len(rec.outputs))]

    def clear(self) -> None:
        for rec in self.records.values():
            rec.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _per_call_blocks(record: _ModuleRecord) -> list[tuple[int, ParamBlock]]:
    """Blocks that can be accumulated call by call: all of them for a module called once,
    only the Kronecker ones (sums over calls) for a module called several times."""
    if len(record.outputs) == 1:
        return record.blocks
    return [(index, block) for index, block in record.blocks if block.kind == "kron"]


def _add(store: dict[int, torch.Tensor], key: int, value: torch.Tensor) -> None:
    if key in store:
        store[key].add_(value)
    else:
        store[key] = value


def _accumulate_linear(
    key: int, a: torch.Tensor, g: torch.Tensor, blocks, G_sums: dict, raw_A: dict, diags: dict
) -> None:
    """a: (B, *, in); g: (K, B, *, out). G is summed per module (weight and bias share it)."""
    d_in, d_out = a.shape[-1], g.shape[-1]
    positions = a[0, ..., 0].numel() if a.ndim > 2 else 1
    kinds = {block.role: (index, block.kind) for index, block in blocks}
    if any(kind == "kron" for _, kind in kinds.values()):
        G_sums[key] = gram(g.reshape(-1, d_out), G_sums.get(key))
        weight = kinds.get("weight")
        if weight is not None and weight[1] == "kron":
            raw_A[weight[0]] = gram(a.reshape(-1, d_in), raw_A.get(weight[0]), 1.0 / positions)
    for role, (index, kind) in kinds.items():
        if kind != "diag":
            continue
        if role == "bias":
            per_sample = g.sum(dim=tuple(range(2, g.ndim - 1))) if g.ndim > 3 else g
            _add(diags, index, per_sample.square().sum((0, 1)))
        elif a.ndim == 2:
            _add(diags, index, torch.einsum("kbo,bi->oi", g.square(), a.square()))
        else:
            a3, g4 = a.reshape(a.shape[0], -1, d_in), g.reshape(g.shape[0], g.shape[1], -1, d_out)
            _add(diags, index, _chunked_sq_sum(g4, a3, "kbso,bsi->kboi", d_out * d_in))


def _chunked_sq_sum(g: torch.Tensor, u: torch.Tensor, equation: str, per_sample: int):
    """Σ_{k,b} (per-sample gradient)², per-sample gradients formed a chunk of samples at a time."""
    k, b = g.shape[0], g.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(1, k * per_sample))
    total = None
    for start in range(0, b, step):
        grads = torch.einsum(equation, g[:, start : start + step], u[start : start + step])
        part = grads.square().sum((0, 1))
        total = part if total is None else total + part
    return total


def _explicit_padding(conv: nn.Conv2d, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Input and integer padding for unfolding; padding='same'/'valid' (possibly asymmetric,
    which unfold cannot express) is applied to the input here, as Conv2d does."""
    if not isinstance(conv.padding, str):
        return a, tuple(conv.padding)
    if conv.padding == "valid":
        return a, (0, 0)
    pads: list[int] = []
    for k, d in reversed(list(zip(conv.kernel_size, conv.dilation))):  # F.pad: last dim first
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(a, pads), (0, 0)


def _accumulate_conv(
    key: int, conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, blocks, G_sums, raw_A, diags
) -> None:
    """a: (B, c, H, W); g: (K, B, out, OH, OW). G is summed per module."""
    a, padding = _explicit_padding(conv, a)
    d_out = g.shape[2]
    positions = g.shape[3] * g.shape[4]
    g_rows = g.permute(0, 1, 3, 4, 2)  # (K, B, OH, OW, out)
    kinds = {block.role: (index, block.kind) for index, block in blocks}
    if any(kind == "kron" for _, kind in kinds.values()):
        G_sums[key] = gram(g_rows.reshape(-1, d_out), G_sums.get(key))
        weight = kinds.get("weight")
        if weight is not None and weight[1] == "kron":
            raw_A[weight[0]] = conv_patch_gram(
                a,
                conv.kernel_size,
                conv.stride,
                padding,
                conv.dilation,
                out=raw_A.get(weight[0]),
                alpha=1.0 / positions,
            )
    for role, (index, kind) in kinds.items():
        if kind != "diag":
            continue
        if role == "bias":
            _add(diags, index, g.sum((3, 4)).square().sum((0, 1)))
        else:
            u = F.unfold(a, conv.kernel_size, conv.dilation, padding, conv.stride)
            g3 = g.reshape(g.shape[0], g.shape[1], d_out, -1)  # (K, B, out, S)
            sq = _chunked_sq_sum(g3, u, "kbos,bis->kboi", d_out * u.shape[1])
            _add(diags, index, sq.reshape(conv.weight.shape))


def _accumulate_mean(module: nn.Module, a: torch.Tensor, blocks, raw_mean: dict) -> None:
    """Σ_n of the layer input averaged over weight-sharing positions (A's "expand" layout)."""
    for index, block in blocks:
        if block.kind != "kron" or block.role != "weight":
            continue
        if isinstance(module, nn.Conv2d):
            x, padding = _explicit_padding(module, a)
            u = F.unfold(
                x.sum(0, keepdim=True), module.kernel_size, module.dilation, padding, module.stride
            )[0]
            total = u.sum(1) / u.shape[1]
        else:
            positions = a[0, ..., 0].numel() if a.ndim > 2 else 1
            total = a.reshape(-1, a.shape[-1]).sum(0) / positions
        _add(raw_mean, index, total)


def _generic_diag(
    model: nn.Module,
    x,
    V: torch.Tensor,
    generic: list[tuple[int, ParamBlock]],
    diags: dict,
) -> None:
    """Exact Σ_{n,k} (J_nᵀ v_nk)² for tensors outside Linear/Conv2d, through torch.func."""
    from torch.func import functional_call, vjp, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    names = [block.name for _, block in generic]

    def single_output(chosen: dict, xi):
        xb = {k: v.unsqueeze(0) for k, v in xi.items()} if isinstance(xi, dict) else xi.unsqueeze(0)
        return functional_call(model, ({**params, **chosen}, buffers), (xb,)).squeeze(0)

    def per_sample(xi, vi):
        _, pullback = vjp(lambda chosen: single_output(chosen, xi), {n: params[n] for n in names})
        return vmap(pullback)(vi)[0]

    try:
        grads = vmap(per_sample)(x, V)
    except Exception as err:  # functorch raises many types; name the tensors involved
        raise ValueError(
            "per-sample gradients (torch.func) failed for the parameters "
            f"{names}, which need an exact diagonal block; make the model's forward "
            "vmap-compatible, freeze these parameters, or use Linear/Conv2d layers. "
            f"Cause: {type(err).__name__}: {err}"
        ) from err
    for index, block in generic:
        _add(diags, index, grads[block.name].square().sum((0, 1)))


# the pass backpropagates to layer outputs, so it needs autograd even when the caller (e.g.
# laplace-torch's fit) runs under torch.no_grad()
@torch.enable_grad()
def accumulate_curvature(
    model: nn.Module,
    batches: Iterable,
    blocks: list[ParamBlock],
    likelihood: str,
    curvature: str,
    generator: torch.Generator | None = None,
    progress: bool = False,
    dict_key_y: str = "labels",
) -> Curvature:
    """Accumulate loss and curvature blocks over all batches (model in eval mode)."""
    check_likelihood(likelihood)
    check_curvature(curvature)
    device = blocks[0].param.device
    dtype = blocks[0].param.dtype
    recorder = _Recorder(blocks)
    generic = [(i, b) for i, b in enumerate(blocks) if not b.via_hooks]
    factors: dict[int, list[torch.Tensor]] = {}
    G_sums: dict[int, torch.Tensor] = {}
    raw_A: dict[int, torch.Tensor] = {}
    diags: dict[int, torch.Tensor] = {}
    raw_mean: dict[int, torch.Tensor] = {}
    loss = torch.zeros((), dtype=dtype, device=device)
    n_data, n_outputs = 0, None
    # in-memory labels are validated once, so the per-batch check needs no device sync
    labels_checked = not isinstance(batches, TensorBatches)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="curvature", disable=not progress, leave=False):
            x, y = split_batch(batch, device, dict_key_y)
            if y.ndim > 0 and y.shape[0] == 0:  # an empty batch (a trailing slice) adds nothing
                continue
            recorder.clear()
            recorder.active = True
            f = model(x)
            if not labels_checked and likelihood == "classification":
                check_label_range(batches.y, f.shape[1])
                labels_checked = True
            check_targets(likelihood, f, y, check_range=not isinstance(batches, TensorBatches))
            n_outputs = f.shape[1]
            n_data += f.shape[0]
            loss += summed_loss(likelihood, f.detach(), y)
            V = pseudo_gradients(likelihood, curvature, f, y, generator).to(f.dtype)
            calls = recorder.outputs()
            if calls:
                outs = [rec.outputs[i] for rec, i in calls]
                if V.shape[1] == 1:
                    grads = torch.autograd.grad(f, outs, V[:, 0], allow_unused=True)
                    grads = [None if g is None else g.unsqueeze(0) for g in grads]
                else:
                    grads = torch.autograd.grad(
                        f,
                        outs,
                        V.transpose(0, 1).contiguous(),
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                for (rec, i), g in zip(calls, grads):
                    if g is None:  # this call does not influence the output
                        continue
                    a = rec.inputs[i]
                    own = _per_call_blocks(rec)
                    key = id(rec.module)
                    if isinstance(rec.module, nn.Conv2d):
                        _accumulate_conv(key, rec.module, a, g, own, G_sums, raw_A, diags)
                    else:
                        _accumulate_linear(key, a, g, own, G_sums, raw_A, diags)
                    _accumulate_mean(rec.module, a, own, raw_mean)
            # a module called more than once: its per-sample gradient is the sum over the
            # calls, so squaring call by call would be wrong; take those diagonals exactly
            shared = [
                item
                for rec in recorder.records.values()
                if len(rec.outputs) > 1
                for item in rec.blocks
                if item[1].kind == "diag"
            ]
            recorder.clear()
            if generic or shared:
                recorder.active = False
                _generic_diag(model, x, V, generic + shared, diags)
    finally:
        recorder.remove()
        model.train(was_training)
    if n_data == 0:
        raise ValueError("the training data yielded no batches (empty loader)")
    for index, block in enumerate(blocks):
        if block.kind == "kron":
            G = G_sums.get(id(block.module))
            if G is None:  # the layer never influenced the output
                G = torch.zeros(block.shape[0], block.shape[0], dtype=dtype, device=device)
            elif block.role == "bias" and _has_kron_weight(blocks, block):
                G = G.clone()  # weight and bias report the same G; keep them independent
            if block.role == "weight":
                d_in = block.param[0].numel()
                A = raw_A.get(index, torch.zeros(d_in, d_in, dtype=dtype, device=device)) / n_data
                factors[index] = [G, A]
            else:
                factors[index] = [G]
        elif index not in diags:
            diags[index] = torch.zeros_like(block.param, memory_format=torch.contiguous_format)
        else:
            diags[index] = diags[index].reshape(block.shape)
    means = {index: total / n_data for index, total in raw_mean.items()}
    result = Curvature(blocks, loss, n_data, n_outputs, factors, diags, means)
    check_finite(result)
    return result


def _has_kron_weight(blocks: list[ParamBlock], bias: ParamBlock) -> bool:
    return any(b.module is bias.module and b.role == "weight" and b.kind == "kron" for b in blocks)


def check_finite(result: Curvature) -> None:
    """Non-finite loss or curvature is an error, never a silent result."""
    if not torch.isfinite(result.loss):
        raise ValueError(
            f"the training loss is not finite ({float(result.loss)}); check the model's "
            "outputs and the data for NaN/Inf"
        )
    for index, block in enumerate(result.blocks):
        parts = result.factors.get(index) or [result.diags[index]]
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            raise ValueError(
                f"the curvature of parameter {block.name!r} contains NaN or Inf; check the "
                "model's outputs and the data"
            )
