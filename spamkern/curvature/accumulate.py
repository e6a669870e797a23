"""One pass over the data that accumulates every curvature block.

Per batch: one forward with hooks that record the input and output of every linear map
whose tensors need curvature — each Linear/Conv1d/Conv2d, and the q/k/v/out projections of
``nn.MultiheadAttention`` (see :mod:`spamkern.curvature.attention`) — then one backward of
the (B, K, C) pseudo-gradients to those outputs only (no weight gradients are formed; exact
GGN's K columns — C − 1 for softmax — go through a single batched backward). From inputs a
and output gradients g:

* Kronecker blocks: A += Σ a aᵀ / S and G += Σ g gᵀ (S = weight-sharing positions, the
  "expand" convention); A is divided by N at the end — laplace-torch's scaling. Grouped
  convolutions sum per group (each group's output channels and input patch); attention's
  packed ``in_proj`` gets one (G, A) per q/k/v slice, A from that slice's own input;
* exact diagonal blocks of Linear/conv layers: Σ_{n,k} (per-sample gradient)² formed from
  a and g;
* any other tensor, a module called more than once, a tied weight: exact per-sample,
  per-column gradients through ``torch.func`` (all uses at once).

Every batch counts; N is the number of samples actually seen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spamkern.curvature.attention import random_state, recorded_attention
from spamkern.curvature.likelihood import (
    check_curvature,
    check_label_range,
    check_likelihood,
    check_targets,
    pseudo_gradients,
    summed_loss,
)
from spamkern.curvature.structure import CONVS, ParamBlock
from spamkern.data.batches import TensorBatches, split_batch
from spamkern.ops import conv_patch_gram
from spamkern.ops.factors import gram_of_columns, gram_upper, mirror_upper_
from spamkern.ops.reductions import all_finite
from spamkern.progress import progress_bar

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
    # Kronecker weights of Linear and groups=1 Conv1d/Conv2d layers: E[a], the mean layer
    # input in A's layout (lets a pruned layer's bias absorb the input mean when its
    # survivors are re-solved without data)
    input_means: dict[int, torch.Tensor] = field(default_factory=dict)

    def block_factors(self) -> list[list[torch.Tensor] | torch.Tensor]:
        """Per block, in parameter order: its Kronecker factors or its diagonal."""
        return [
            self.factors[i] if i in self.factors else self.diags[i] for i in range(len(self.blocks))
        ]


class _ModuleRecord:
    """Every call of one hooked module during a forward: per call and per recorded linear map
    ("main" for a Linear/conv, q/k/v/out for attention) its input, output and the number of
    weight-sharing positions per sample (None: derived from the shapes)."""

    def __init__(self, module: nn.Module, blocks: list[tuple[int, ParamBlock]]):
        self.module = module
        self.blocks = blocks
        self.calls: list[dict[str, tuple[torch.Tensor, torch.Tensor, int | None]]] = []
        self.random_state = None  # attention: the random state before its forward

    def clear(self) -> None:
        self.calls.clear()


class _Recorder:
    """Forward hooks on the modules whose parameters need curvature from hooks."""

    def __init__(self, blocks: list[ParamBlock]):
        self.records: dict[int, _ModuleRecord] = {}
        for index, block in enumerate(blocks):
            if block.via_hooks:
                key = id(block.module)
                if key not in self.records:
                    self.records[key] = _ModuleRecord(block.module, [])
                self.records[key].blocks.append((index, block))
        self.active = True
        self._handles = [h for rec in self.records.values() for h in self._register(rec)]

    def _register(self, record: _ModuleRecord) -> list:
        module = record.module
        if isinstance(module, nn.MultiheadAttention):
            return [
                module.register_forward_pre_hook(
                    self._attention_pre_hook(record), with_kwargs=True
                ),
                module.register_forward_hook(self._attention_hook(record), with_kwargs=True),
            ]
        return [module.register_forward_hook(self._hook(record))]

    def _hook(self, record: _ModuleRecord):
        def hook(module, inputs, output):
            if self.active:
                record.calls.append({"main": (inputs[0].detach(), output, None)})

        return hook

    def _attention_pre_hook(self, record: _ModuleRecord):
        def hook(module, args, kwargs):
            record.random_state = random_state(module, args, kwargs) if self.active else None

        return hook

    def _attention_hook(self, record: _ModuleRecord):
        def hook(module, args, kwargs, output):
            if not self.active:
                return None
            output, sites = recorded_attention(module, args, kwargs, output, record.random_state)
            record.calls.append({k: (a.detach(), out, n) for k, (a, out, n) in sites.items()})
            return output

        return hook

    def outputs(self) -> list[tuple[_ModuleRecord, int, str]]:
        return [
            (rec, i, site)
            for rec in self.records.values()
            for i, call in enumerate(rec.calls)
            for site in call
        ]

    def clear(self) -> None:
        for rec in self.records.values():
            rec.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _per_call_blocks(record: _ModuleRecord, site: str) -> list[tuple[int, ParamBlock]]:
    """Blocks of one recorded map that can be accumulated call by call: all of them for a
    module called once, only the Kronecker ones (sums over calls) for a module called
    several times."""
    own = [(index, block) for index, block in record.blocks if site in block.sites]
    if len(record.calls) == 1:
        return own
    return [(index, block) for index, block in own if block.kind == "kron"]


def _add(store: dict[int, torch.Tensor], key: int, value: torch.Tensor) -> None:
    if key in store:
        store[key].add_(value)
    else:
        store[key] = value


def _needs(blocks) -> tuple[bool, bool]:
    """(G needed, A needed): any Kronecker block, any Kronecker weight among ``blocks``."""
    kron = [block for _, block in blocks if block.kind == "kron"]
    return bool(kron), any(block.has_input_factor for block in kron)


def _accumulate_linear(
    key, a: torch.Tensor, g: torch.Tensor, positions, blocks, G_sums, raw_A, diags, with_A=True
) -> None:
    """a: (B, *, in) (or sequence-first for attention, with ``positions`` given);
    g: (K, B, *, out). G is summed per recorded map (weight and bias share it); A only
    ``with_A`` (False: given from elsewhere)."""
    d_in, d_out = a.shape[-1], g.shape[-1]
    if positions is None:
        positions = a[0, ..., 0].numel() if a.ndim > 2 else 1
    need_G, need_A = _needs(blocks)
    need_A = need_A and with_A
    if need_G:
        G_sums[key] = gram_upper(g.reshape(-1, d_out), G_sums.get(key))
    if need_A:
        raw_A[key] = gram_upper(a.reshape(-1, d_in), raw_A.get(key), 1.0 / positions)
    for index, block in blocks:
        if block.kind != "diag":
            continue
        if block.role == "bias":
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


def _as_conv2d(conv: nn.Module, a: torch.Tensor):
    """A Conv1d/Conv2d input as a 2-D convolution's: ``(input, kernel, stride, padding,
    dilation)``. Padding that unfold cannot express (string padding, possibly asymmetric;
    non-zero padding modes) is applied to the input here, exactly as the layer does."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.kernel_size)
    else:
        padding = tuple(conv.padding)
    kernel, stride, dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
    if isinstance(conv, nn.Conv1d):  # a 1-D convolution is a 2-D one over a height-1 input
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        return a.unsqueeze(2), kernel, stride, (0, *padding), dilation
    return a, kernel, stride, padding, dilation


def _grouped_gram(x: torch.Tensor, out: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``out += alpha · x_jᵀ x_j`` per group for ``x`` of shape (groups, rows, d)."""
    prod = torch.bmm(x.transpose(1, 2), x)
    return prod.mul_(alpha) if out is None else out.add_(prod, alpha=alpha)


def _accumulate_conv(
    key,
    conv: nn.Module,
    a: torch.Tensor,
    g: torch.Tensor,
    blocks,
    G_sums,
    raw_A,
    diags,
    with_A=True,
) -> None:
    """a: (B, c, *spatial); g: (K, B, out, *spatial_out). G is summed per module; with
    ``groups`` > 1 both factors are per group, stacked: G (g, out/g, out/g), A (g, d, d);
    A only ``with_A``."""
    a, kernel, stride, padding, dilation = _as_conv2d(conv, a)
    g = g.reshape(*g.shape[:3], -1)  # (K, B, out, S)
    groups, d_out, positions = conv.groups, g.shape[2], g.shape[3]
    rows = d_out // groups
    need_G, need_A = _needs(blocks)
    need_A = need_A and with_A
    grouped_u = None
    if need_G and groups == 1 and positions >= d_out:  # few channels over many positions
        G_sums[key] = gram_of_columns(g.reshape(-1, d_out, positions), G_sums.get(key))
    elif need_G:
        g_rows = g.permute(0, 1, 3, 2).reshape(-1, d_out)  # (K·B·S, out)
        if groups == 1:
            G_sums[key] = gram_upper(g_rows, G_sums.get(key))
        else:
            g_groups = g_rows.reshape(-1, groups, rows).transpose(0, 1)
            G_sums[key] = _grouped_gram(g_groups, G_sums.get(key), 1.0)
    if need_A and groups == 1:
        raw_A[key] = conv_patch_gram(
            a, kernel, stride, padding, dilation, out=raw_A.get(key), alpha=1.0 / positions
        )
    elif need_A:
        grouped_u = _grouped_patches(a, conv, kernel, stride, padding, dilation)
        u_rows = grouped_u.permute(1, 0, 3, 2).reshape(groups, -1, grouped_u.shape[2])
        raw_A[key] = _grouped_gram(u_rows, raw_A.get(key), 1.0 / positions)
    for index, block in blocks:
        if block.kind != "diag":
            continue
        if block.role == "bias":
            _add(diags, index, g.sum(3).square().sum((0, 1)))
            continue
        if grouped_u is None:
            grouped_u = _grouped_patches(a, conv, kernel, stride, padding, dilation)
        d = grouped_u.shape[2]
        g5 = g.reshape(g.shape[0], g.shape[1], groups, rows, positions)
        sq = _chunked_sq_sum(g5, grouped_u, "kbgrs,bgds->kbgrd", d_out * d)
        _add(diags, index, sq.reshape(conv.weight.shape))


def _grouped_patches(a, conv, kernel, stride, padding, dilation) -> torch.Tensor:
    """(B, groups, d, S) unfolded input patches, d = in/groups·kernel positions; unfold's
    (channel, kernel position) order makes each group's channels one contiguous run."""
    u = F.unfold(a, kernel, dilation, padding, stride)
    return u.reshape(u.shape[0], conv.groups, -1, u.shape[-1])


def _accumulate_mean(module: nn.Module, a: torch.Tensor, positions, blocks, raw_mean) -> None:
    """Σ_n of the layer input averaged over weight-sharing positions (A's layout)."""
    for index, block in blocks:
        if block.kind != "kron" or block.role != "weight":
            continue
        if isinstance(module, CONVS) and module.groups == 1:
            x, kernel, stride, padding, dilation = _as_conv2d(module, a)
            u = F.unfold(x.sum(0, keepdim=True), kernel, dilation, padding, stride)[0]
            total = u.sum(1) / u.shape[1]
        elif isinstance(module, nn.Linear):
            if positions is None:
                positions = a[0, ..., 0].numel() if a.ndim > 2 else 1
            total = a.reshape(-1, a.shape[-1]).sum(0) / positions
        else:  # grouped convolutions, attention projections: no mean recorded
            continue
        _add(raw_mean, index, total)


def _generic_diag(
    model: nn.Module,
    x,
    V: torch.Tensor,
    generic: list[tuple[int, ParamBlock]],
    diags: dict,
) -> None:
    """Exact Σ_{n,k} (J_nᵀ v_nk)² for tensors without hooks, through torch.func (a tied
    tensor is replaced in every module that holds it, so all its uses count)."""
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
            "vmap-compatible, freeze these parameters, or use Linear/conv layers. "
            f"Cause: {type(err).__name__}: {err}"
        ) from err
    for index, block in generic:
        _add(diags, index, grads[block.name].square().sum((0, 1)))


@dataclass
class PassSums:
    """What one pass over the data adds up: per recorded map ((module id, site)) the Gram
    sums of output gradients (``G``) and inputs (``A``), upper triangles only until
    :func:`assemble_curvature`; per block the diagonal sums and Σ_n E[a]; the summed loss."""

    loss: torch.Tensor
    G: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    A: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    diags: dict[int, torch.Tensor] = field(default_factory=dict)
    means: dict[int, torch.Tensor] = field(default_factory=dict)
    n_data: int = 0
    n_outputs: int | None = None

    def count(self, f: torch.Tensor, batch_loss: torch.Tensor) -> None:
        """A batch of outputs ``f`` (B, C) and its summed loss."""
        self.loss += batch_loss
        self.n_data += f.shape[0]
        self.n_outputs = f.shape[1]


def assemble_curvature(
    blocks: list[ParamBlock], sums: PassSums, input_factors: dict[int, torch.Tensor]
) -> Curvature:
    """The finished pass in laplace-torch's layout and scaling: Kronecker factors per block
    (A divided by N, or taken from ``input_factors``), diagonals shaped like their tensors
    (zeros where nothing reached them), mean inputs; checked for NaN/Inf."""
    mirror_sums(sums.G, sums.A)
    factors: dict[int, list[torch.Tensor]] = {}
    diags: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks):
        if block.kind == "kron":
            given = input_factors.get(index)
            factors[index] = _kron_factors(block, sums.G, sums.A, sums.n_data, given)
        elif index in sums.diags:
            diags[index] = sums.diags[index].reshape(block.shape)
        else:
            diags[index] = torch.zeros_like(block.param, memory_format=torch.contiguous_format)
    means = {index: total / sums.n_data for index, total in sums.means.items()}
    result = Curvature(blocks, sums.loss, sums.n_data, sums.n_outputs, factors, diags, means)
    check_finite(result, checked=input_factors.values())
    return result


def output_gradients(f: torch.Tensor, outs: list[torch.Tensor], V: torch.Tensor) -> list:
    """The (K, B, ...) gradients of ``f``'s pseudo-gradient columns ``V`` (B, K, C) with
    respect to the recorded layer outputs, all K columns in one batched backward (None for
    an output that does not influence ``f``)."""
    if V.shape[1] == 1:
        grads = torch.autograd.grad(f, outs, V[:, 0], allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    columns = V.transpose(0, 1).contiguous()
    return list(torch.autograd.grad(f, outs, columns, allow_unused=True, is_grads_batched=True))


class _RefitPass:
    """The per-batch work of :func:`accumulate_curvature`: a recorded forward, one
    backward of the pseudo-gradients to the recorded layer outputs, the sums of each."""

    def __init__(self, model, blocks, likelihood, curvature, generator, input_factors, labels):
        self.model, self.generator = model, generator
        self.likelihood, self.curvature = likelihood, curvature
        self.recorder = _Recorder(blocks)
        self.generic = [(i, b) for i, b in enumerate(blocks) if not b.via_hooks]
        self.given_A = {
            (id(blocks[i].module), site) for i in input_factors for site in blocks[i].sites
        }
        param = blocks[0].param
        self.sums = PassSums(loss=torch.zeros((), dtype=param.dtype, device=param.device))
        # in-memory labels are range-checked once, at the first batch (C is known then), so
        # the per-batch check needs no device sync; None: each batch checks its own
        self.unchecked_labels, self.per_batch_range = labels, labels is None

    def add_batch(self, x, y: torch.Tensor) -> None:
        self.recorder.clear()
        self.recorder.active = True
        f = self.model(x)
        self._check_targets(f, y)
        self.sums.count(f, summed_loss(self.likelihood, f.detach(), y))
        V = pseudo_gradients(self.likelihood, self.curvature, f, y, self.generator).to(f.dtype)
        calls = self.recorder.outputs()
        if calls:
            outs = [rec.calls[i][site][1] for rec, i, site in calls]
            self._add_calls(calls, output_gradients(f, outs, V))
        shared = self._shared_diag_blocks()
        self.recorder.clear()
        if self.generic or shared:
            self.recorder.active = False
            _generic_diag(self.model, x, V, self.generic + shared, self.sums.diags)

    def _check_targets(self, f: torch.Tensor, y: torch.Tensor) -> None:
        if self.unchecked_labels is not None and self.likelihood == "classification":
            check_label_range(self.unchecked_labels, f.shape[1])
            self.unchecked_labels = None
        check_targets(self.likelihood, f, y, check_range=self.per_batch_range)

    def _add_calls(self, calls, grads) -> None:
        sums = self.sums
        for (rec, i, site), g in zip(calls, grads):
            if g is None:  # this call does not influence the output
                continue
            a, _, positions = rec.calls[i][site]
            own, key = _per_call_blocks(rec, site), (id(rec.module), site)
            parts = (sums.G, sums.A, sums.diags, key not in self.given_A)
            if isinstance(rec.module, CONVS):
                _accumulate_conv(key, rec.module, a, g, own, *parts)
            else:
                _accumulate_linear(key, a, g, positions, own, *parts)
            _accumulate_mean(rec.module, a, positions, own, sums.means)

    def _shared_diag_blocks(self) -> list[tuple[int, ParamBlock]]:
        """Diagonal blocks of modules called more than once: their per-sample gradient is
        the sum over the calls, so squaring call by call would be wrong; taken exactly."""
        return [
            item
            for rec in self.recorder.records.values()
            if len(rec.calls) > 1
            for item in rec.blocks
            if item[1].kind == "diag"
        ]


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
    input_factors: dict[int, torch.Tensor] | None = None,
) -> Curvature:
    """Accumulate loss and curvature blocks over all batches (model in eval mode).

    ``input_factors`` (block index → A, already divided by N) are taken as given instead
    of accumulated, e.g. the data-only A of a first layer computed in an earlier pass.
    """
    check_likelihood(likelihood)
    check_curvature(curvature)
    input_factors = input_factors or {}
    labels = batches.y if isinstance(batches, TensorBatches) else None
    refit = _RefitPass(model, blocks, likelihood, curvature, generator, input_factors, labels)
    device = blocks[0].param.device
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(batches, desc="curvature", enabled=progress, leave=False):
            x, y = split_batch(batch, device, dict_key_y)
            if y.ndim > 0 and y.shape[0] == 0:  # an empty batch (a trailing slice) adds nothing
                continue
            refit.add_batch(x, y)
    finally:
        refit.recorder.remove()
        model.train(was_training)
    if refit.sums.n_data == 0:
        raise ValueError("the training data yielded no batches (empty loader)")
    return assemble_curvature(blocks, refit.sums, input_factors)


def mirror_sums(*stores: dict) -> None:
    """Complete the Gram sums, accumulated on their upper triangle only, once per pass."""
    for store in stores:
        for value in store.values():
            mirror_upper_(value)


def _kron_factors(
    block: ParamBlock, G_sums: dict, raw_A: dict, n_data: int, given_A: torch.Tensor | None
) -> list:
    """``[G, A]`` (weight) or ``[G]`` (bias) of one block from the per-map sums, A taken as
    ``given_A`` when one is (already divided by N); row-sliced blocks (grouped convs, packed
    q/k/v) get stacked factors, one slice per leading index."""
    slices = block.row_slices
    rows = block.shape[0] // slices
    like = block.param

    def site_factor(store: dict, site: str, size: int) -> torch.Tensor:
        value = store.get((id(block.module), site))
        if value is None:  # the map never influenced the output
            stacked = (slices,) if isinstance(block.module, CONVS) and slices > 1 else ()
            return like.new_zeros(*stacked, size, size)
        return value

    def factor(store: dict, size: int) -> torch.Tensor:
        parts = [site_factor(store, site, size) for site in block.sites]
        if len(parts) > 1:
            return torch.stack(parts)
        # a bias shares G with its weight; clone so the two blocks stay independent
        return parts[0] if block.has_input_factor else parts[0].clone()

    G = factor(G_sums, rows)
    if not block.has_input_factor:
        return [G]
    if given_A is not None:
        return [G, given_A]
    return [G, factor(raw_A, block.param[0].numel()) / n_data]


def check_finite(result: Curvature, checked: Iterable[torch.Tensor] = ()) -> None:
    """Non-finite loss or curvature is an error, never a silent result. Factors in
    ``checked`` (given from an earlier, checked pass) are not scanned again."""
    seen = {id(factor) for factor in checked}
    if not torch.isfinite(result.loss):
        raise ValueError(
            f"the training loss is not finite ({float(result.loss)}); check the model's "
            "outputs and the data for NaN/Inf"
        )
    for index, block in enumerate(result.blocks):
        parts = result.factors.get(index) or [result.diags[index]]
        parts = [p for p in parts if id(p) not in seen]
        if not all(all_finite(p) for p in parts):
            raise ValueError(
                f"the curvature of parameter {block.name!r} contains NaN or Inf; check the "
                "model's outputs and the data"
            )
