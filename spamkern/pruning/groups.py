"""Coupled channel groups of any traceable model, found by Torch-Pruning's dependency graph.

Removing output channel c of one layer forces the same channel out of every tensor it is
tied to: the layers whose outputs are added to it (residual connections), concatenated
or normalised with it, and the inputs of every layer that reads it. Torch-Pruning traces
the model's autograd graph on ``example_inputs`` and returns, for each *root* layer, the
group of parameter slices that go together; this module turns each group into a
:class:`ChannelFamily`:

* ``producers``: the slices that *make* channel c (Linear/Conv rows and biases, BatchNorm
  γ/β, embedding columns, bare parameters). When all of them are zero the channel is an
  exact zero everywhere downstream, so the masked model already computes what the
  smaller model will. Their scores are summed into the unit's score.
* ``consumers``: the input columns of the layers that read channel c. They multiply an
  exact zero in the masked model and are removed only by ``compress``.
* ``unit``: channels removed together. 1, except for attention projections, whose
  channels go in whole heads (a head's width fixes the softmax scale and the reshape).
* ``reason``: why the family cannot be removed exactly (``None`` when it can). A channel
  that passes a LayerNorm/GroupNorm is normalised *together* with the others, so zeroing
  it changes the rest; ``nn.MultiheadAttention``'s embedding width ties its inputs to its
  outputs (build attention from Linear layers, like :class:`spamkern.models.SelfAttention`,
  to remove heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ChannelFamily",
    "Slice",
    "channel_families",
    "default_inputs",
    "is_plain_chain",
    "register_attention",
    "successors",
]

# Attention modules whose q/k/v projections are laid out head by head:
# type → function(module) → (the projections' modules, channels per head).
_ATTENTION: dict[type, Callable[[nn.Module], tuple[list[nn.Module], int]]] = {}


def register_attention(
    cls: type, layout: Callable[[nn.Module], tuple[list[nn.Module], int]]
) -> None:
    """Declare ``cls`` an attention module: ``layout(m)`` gives the modules whose output
    channels are split into heads, in the order q, k, v (the last one, the values, is what
    the output projection reads), and the head width. Their channels are then
    pruned and removed in whole heads only. The module must derive its head count from
    the projections' width at run time (as :class:`spamkern.models.SelfAttention` does).
    """
    _ATTENTION[cls] = layout


def _self_attention_layout(m: nn.Module) -> tuple[list[nn.Module], int]:
    return [m.q, m.k, m.v], m.head_dim


def _register_builtin() -> None:
    from spamkern.models import SelfAttention

    register_attention(SelfAttention, _self_attention_layout)


_register_builtin()


@dataclass
class Slice:
    """Positions ``index`` along dimension ``dim`` of parameter ``param`` that belong to
    root channels ``root`` (equal length: entry j of the slice is root channel root[j])."""

    param: str
    dim: int
    root: torch.Tensor
    index: torch.Tensor


@dataclass
class ChannelFamily:
    """All coupled groups of one root layer: channel c of the root and everything tied to it."""

    root: str  # qualified name of the root module
    n_channels: int
    producers: list[Slice] = field(default_factory=list)
    consumers: list[Slice] = field(default_factory=list)
    unit: int = 1
    reason: str | None = None  # why it cannot be removed exactly; None when it can
    is_output: bool = False  # its channels are (part of) the model's output

    @property
    def n_units(self) -> int:
        return self.n_channels // self.unit

    def producer_params(self) -> set[str]:
        return {s.param for s in self.producers}


# ---------------------------------------------------------------------------- inputs
def custom_forward(model: nn.Module) -> str | None:
    """Name of a Sequential container whose ``forward`` is not Sequential's own, if any."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward:
            return name or "the model"
    return None


def is_plain_chain(model: nn.Module) -> bool:
    """Whether ``model`` is a (nested) nn.Sequential of leaves with Sequential's forward:
    its layers then feed each other in order and need no tracing."""
    return (
        isinstance(model, nn.Sequential)
        and custom_forward(model) is None
        and all(
            isinstance(m, nn.Sequential) or not any(True for _ in m.children())
            for m in model.modules()
        )
    )


def default_inputs(model: nn.Module, n: int = 8):
    """A random batch for tracing and probing when none is given, where the model's input
    is known: a model recording ``input_shape`` (and ``vocab_size`` for token ids), as
    spamkern's ResNet and ViT do; a model whose first layer is a Linear; a Conv2d-first
    Sequential (the smallest square image ≤ 64 it accepts). ``None`` otherwise."""
    p = next(model.parameters(), None)
    if p is None:
        return None
    gen = torch.Generator().manual_seed(0)
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        vocab = getattr(model, "vocab_size", None)
        if vocab is not None:
            return torch.randint(0, vocab, (n, *shape), generator=gen).to(p.device)
        return torch.randn(n, *shape, generator=gen, dtype=p.dtype).to(p.device)
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    if isinstance(first, nn.Linear):
        return torch.randn(n, first.in_features, generator=gen, dtype=p.dtype).to(p.device)
    if first is None or not isinstance(model, nn.Sequential):
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for size in range(1, 65):
                x = torch.randn(n, first.in_channels, size, size, generator=gen, dtype=p.dtype)
                try:
                    model(x[:1].to(p.device))
                except RuntimeError:
                    continue
                return x.to(p.device)
    finally:
        model.train(was_training)
    return None


# ---------------------------------------------------------------------------- tracing
def _call(model: nn.Module, example_inputs):
    """``model`` applied to a batch, a tuple of positional inputs or a dict of keywords."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple | list):
        return model(*example_inputs)
    return model(example_inputs)


def build_graph(model: nn.Module, example_inputs):
    """Torch-Pruning's dependency graph of ``model`` on ``example_inputs``; clear errors
    when the model cannot be run or traced. The model's train/eval mode is restored."""
    import torch_pruning as tp

    if example_inputs is None:
        raise ValueError("tracing needs example_inputs: a batch the model accepts")
    was_training = model.training
    try:
        with torch.enable_grad():
            model.eval()
            try:
                out = _call(model, example_inputs)
            except Exception as err:
                raise ValueError(
                    f"cannot trace the model: its forward on example_inputs raised "
                    f"{type(err).__name__}: {err}"
                ) from err
            outs = out if isinstance(out, tuple | list) else [out]
            if not any(isinstance(o, torch.Tensor) and o.grad_fn is not None for o in outs):
                raise ValueError(
                    "cannot trace the model: its output carries no autograd graph on "
                    "example_inputs (the forward detaches, runs under torch.no_grad, or "
                    "leaves torch), so the layers coupled to each channel cannot be found"
                )
            try:
                return tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, verbose=False
                )
            except Exception as err:
                raise ValueError(
                    f"cannot trace the model with Torch-Pruning: {type(err).__name__}: {err}"
                ) from err
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- slices
def _param_slices(
    module, names: dict, dg, out_side: bool
) -> tuple[list[tuple[str, int]], str | None]:
    """(parameter name, dim) of ``module`` indexed by its output (or input) channel, or a
    reason why removing such a channel is not exact."""
    prefix = names.get(module)
    if isinstance(module, nn.Parameter):
        name = dg._param_to_name.get(module)
        pdim = dg.module2node[module].pruning_dim
        return ([(name, pdim)] if name else []), None
    if prefix is None:  # an operation without parameters (add, reshape, activation, ...)
        return [], None

    def p(attr: str) -> str:
        return f"{prefix}.{attr}" if prefix else attr

    if isinstance(module, nn.Linear):
        if out_side:
            return [(p("weight"), 0)] + ([(p("bias"), 0)] if module.bias is not None else []), None
        return [(p("weight"), 1)], None
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.transposed or (module.groups != 1 and not depthwise):
            return [], f"{prefix!r} is a transposed or grouped convolution"
        if out_side or depthwise:
            bias = [(p("bias"), 0)] if module.bias is not None else []
            return [(p("weight"), 0)] + bias, None
        return [(p("weight"), 1)], None
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
            return [], f"{prefix!r} is a BatchNorm without affine parameters (0 ↦ −μ/σ ≠ 0)"
        if not module.affine:
            return [], None
        return [(p("weight"), 0), (p("bias"), 0)], None
    if isinstance(module, nn.PReLU):
        return [], None  # PReLU(0) = 0 per channel: nothing to zero, only to remove
    if isinstance(module, nn.Embedding):
        return [(p("weight"), 1)], None
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        return [], f"{prefix!r} ({type(module).__name__}) normalises across channels"
    if isinstance(module, nn.MultiheadAttention):
        return [], (
            f"{prefix!r} is an nn.MultiheadAttention, whose embedding width ties its inputs to "
            "its outputs (build attention from Linear layers to remove heads)"
        )
    return [], f"{prefix!r} ({type(module).__name__}) has no known channel layout"


def _family(dg, group, root: nn.Module, names: dict) -> ChannelFamily:
    fam = ChannelFamily(root=names[root], n_channels=dg.get_out_channels(root))
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        out_side = dg.is_out_channel_pruning_fn(dep.handler)
        if not out_side and not dg.is_in_channel_pruning_fn(dep.handler):
            continue
        slices, reason = _param_slices(module, names, dg, out_side)
        if out_side and reason is None:
            reason = _untraced_operand(dep.target)
        if reason and fam.reason is None:
            fam.reason = reason
        root_idx = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        index = torch.as_tensor(list(idxs), dtype=torch.long)
        target = fam.producers if out_side else fam.consumers
        target.extend(Slice(name, dim, root_idx, index) for name, dim in slices)
        if out_side:
            fam.is_output |= _reaches_output(dg.module2node.get(module))
    fam.unit = _head_width(fam, names)
    return fam


def _untraced_operand(node) -> str | None:
    """A reason when channels are added to a tensor outside the traced graph (the model's
    input or a constant): removed channels would then not be zero there."""
    fn = getattr(node, "grad_fn", None)
    name = fn.name() if fn is not None and hasattr(fn, "name") else ""
    if not name.startswith(("AddBackward", "SubBackward")):
        return None
    if any(f is None for f, _ in fn.next_functions) or len(fn.next_functions) < 2:
        return (
            "its channels are added to a tensor outside the traced graph (the model's input "
            "or a constant), where removed channels are not zero"
        )
    return None


def _reaches_output(node) -> bool:
    """Whether a node's result is (part of) the model's output."""
    if node is None:
        return False
    is_out = lambda n: type(n.module).__name__ == "_OutputOp"  # noqa: E731
    return is_out(node) or not node.outputs or any(is_out(o) for o in node.outputs)


def _head_width(fam: ChannelFamily, names: dict) -> int:
    """Channels per removable unit: the head width when the family holds q/k/v projections."""
    produced = {s.param.rpartition(".")[0] for s in fam.producers}
    for module in names:
        layout = _ATTENTION.get(type(module))
        if layout is None:
            continue
        projections, width = layout(module)
        if any(names.get(m) in produced for m in projections):
            if fam.n_channels % width:
                fam.reason = fam.reason or f"{fam.root!r} is not a whole number of heads"
            return width
    return 1


def channel_families(model: nn.Module, example_inputs, dg=None) -> list[ChannelFamily]:
    """The coupled channel families of ``model``, one per root Linear/Conv layer (in graph
    order), traced on ``example_inputs`` (or read from its dependency graph ``dg``). See
    the module docs for what each holds."""
    import torch_pruning as tp

    dg = dg if dg is not None else build_graph(model, example_inputs)
    names: dict = {m: n for n, m in model.named_modules()}
    families = []
    for group in dg.get_all_groups(root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
        root = group[0].dep.target.module
        families.append(_family(dg, group, root, names))
    return families


def unit_values(
    family: ChannelFamily, tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``tensors`` over each unit's producer entries, number of those entries).

    Producers missing from ``tensors`` add neither value nor size; bool tensors (masks)
    sum to the number of kept entries.
    """
    n = family.n_channels
    values = torch.zeros(n, dtype=torch.float64)
    sizes = torch.zeros(n, dtype=torch.float64)
    for s in family.producers:
        t = tensors.get(s.param)
        if t is None:
            continue
        rows = t.detach().movedim(s.dim, 0).reshape(t.shape[s.dim], -1).cpu().double()
        values.index_add_(0, s.root, rows.sum(dim=1)[s.index])
        sizes.index_add_(
            0, s.root, torch.full((len(s.root),), float(rows.shape[1]), dtype=torch.float64)
        )
    u = family.unit
    return values.reshape(-1, u).sum(dim=1), sizes.reshape(-1, u).sum(dim=1)


def _layer_of(param: str, modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    name = param.rpartition(".")[0]
    m = modules.get(name)
    return (name, m) if isinstance(m, nn.Linear | nn.Conv2d) else None


def successors(
    model: nn.Module, example_inputs, families: list[ChannelFamily] | None = None
) -> dict[str, tuple[str, nn.Module, int]]:
    """Layer name → (next layer's name, next layer, input columns per channel) wherever a
    removed unit's output is read by exactly one Linear/Conv2d and by nothing else.

    This is where next-layer compensation applies (re-fitting the reader's kept input
    columns by least squares): a layer whose channels reach their reader directly
    (through activations, pooling, a per-channel BatchNorm or Flatten) or an attention
    module's value projection (read by the output projection). It does not apply to
    channels coupled by residual additions (a removed channel also leaves the sum, which
    no reader can re-fit), to the output layer, or to groups that cannot go exactly.
    """
    if families is None:
        families = channel_families(model, example_inputs)
    modules = dict(model.named_modules())
    out = {}
    for f in families:
        if f.reason is not None or f.is_output or len({s.param for s in f.consumers}) != 1:
            continue
        reader = _layer_of(f.consumers[0].param, modules)
        sources = {lay[0] for s in f.producers if (lay := _layer_of(s.param, modules))}
        if reader is None or (isinstance(reader[1], nn.Conv2d) and reader[1].groups != 1):
            continue
        if len(sources) > 1:  # heads: the value projection feeds the reader
            owner = next(
                (m for m in modules.values() if type(m) in _ATTENTION
                 and {modules.get(n) for n in sources} <= set(_ATTENTION[type(m)](m)[0])),
                None,
            )  # fmt: skip
            if owner is None:
                continue  # several layers write the channel: a residual sum
            value = _ATTENTION[type(owner)](owner)[0][-1]
            sources = {n for n in sources if modules[n] is value}
        (source,) = sources
        rm = reader[1]
        width = rm.in_channels if isinstance(rm, nn.Conv2d) else rm.in_features
        if len(f.consumers[0].index) != width or width % f.n_channels:
            continue  # the reader sees these channels among others (a concatenation)
        per_channel = rm.weight[0, 0].numel() if isinstance(rm, nn.Conv2d) else 1
        if isinstance(rm, nn.Linear):
            per_channel = width // f.n_channels  # after Flatten: each channel's positions
        out[source] = (reader[0], rm, per_channel)
    return out
