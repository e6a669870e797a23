"""Turn masks into a model that is really smaller or faster, and measure it.

* ``unit`` masks: removed units disappear — a Linear row / Conv2d filter and its bias
  leave the layer, and the matching inputs leave the next layer (through activations,
  pooling, dropout and Flatten). Plain :class:`torch.nn.Sequential` stacks are shrunk
  layer by layer; any other model (residual networks, transformers, Sequential
  subclasses with their own ``forward``) is traced on ``example_inputs`` and its coupled
  channel groups (:mod:`spamkern.pruning.groups`) are removed with Torch-Pruning's
  pruning functions. Either way the result is run against the masked model on a probe
  batch and refused (ValueError) unless they agree to 1e-5 relative; masks that cannot
  be removed exactly raise a ValueError naming the layers.
* ``block`` masks: the masked weights go to
  ``spamkern.sparse.convert_to_block_sparse`` (Linear layers become BlockSparseLinear).
* ``2:4`` masks: masked Linear layers become ``spamkern.sparse.SemiStructuredLinear``
  (cuSPARSELt on GPUs where it pays, the masked dense weight otherwise); masked Conv2d
  layers stay masked dense.
* ``unstructured`` masks: a masked dense copy (no faster kernel exists for them here).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from spamkern.pruning.groups import default_inputs, is_plain_chain
from spamkern.pruning.masks import PATTERNS, apply_masks

__all__ = ["compress", "compression_report", "count_flops", "count_params", "measure_latency"]

# Modules through which a removed unit stays exactly zero and channels stay independent:
# f(0) = 0 per element or per channel, so its inputs in the next layer can be dropped.
_ZERO_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softsign,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, nn.Module, str]]:
    """(qualified name, leaf, parent, attribute) of a (nested) Sequential, in order."""
    if not isinstance(module, nn.Sequential):
        raise ValueError(
            f"compress shrinks residual-free nn.Sequential stacks; {prefix or 'the model'} is "
            f"a {type(module).__name__}"
        )
    out = []
    for attr, child in module.named_children():
        name = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, nn.Sequential):
            out.extend(_leaves(child, name))
        elif any(True for _ in child.children()):
            raise ValueError(
                f"module {name!r} ({type(child).__name__}) is a container compress cannot "
                "follow; build the model as a flat or nested nn.Sequential"
            )
        else:
            out.append((name, child, module, attr))
    return out


def _kept_units(name: str, module: nn.Module, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool (out,) of the units a unit mask keeps; checks the mask is all-or-nothing per row."""
    w = module.weight
    wm = masks.get(f"{name}.weight")
    keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    if wm is not None:
        rows = wm.reshape(wm.shape[0], -1).to(w.device)
        keep = rows.any(dim=1)
        if not bool((rows.all(dim=1) == keep).all()):
            raise ValueError(
                f"the mask of {name}.weight is not a unit mask (some rows are partly pruned); "
                "compress needs masks from prune(..., pattern='unit')"
            )
    bm = masks.get(f"{name}.bias")
    if bm is not None and module.bias is not None:
        if wm is None:
            keep = bm.to(w.device).clone()
        elif not bool((bm.to(w.device) == keep).all()):
            raise ValueError(f"the masks of {name}.weight and {name}.bias disagree on units")
    return keep


def _new_linear(old: nn.Linear, rows: torch.Tensor, cols: torch.Tensor | None) -> nn.Linear:
    w = old.weight.detach()[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(
        w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach()[rows])
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def _new_conv(old: nn.Conv2d, rows: torch.Tensor, cols: torch.Tensor | None) -> nn.Conv2d:
    w = old.weight.detach()[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Conv2d(
        w.shape[1],
        w.shape[0],
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach()[rows])
    return new


def _direct_input(mod: nn.Module, layout: str) -> bool:
    """Whether the kept indices of the previous layer index ``mod``'s inputs directly."""
    if isinstance(mod, nn.Linear):
        return layout == "features"
    return layout == "channels"


def _compress_units(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    new_model = copy.deepcopy(model)
    apply_masks(new_model, masks)
    leaves = _leaves(new_model)
    layer_names = [n for n, m, _, _ in leaves if isinstance(m, nn.Linear | nn.Conv2d)]
    known = {f"{n}.{a}" for n in layer_names for a in ("weight", "bias")}
    unknown = sorted(set(masks) - known)
    if unknown:
        raise ValueError(f"unit masks for parameters compress cannot shrink: {unknown}")
    # State of the tensor flowing between leaves: which input features/channels survive.
    keep_idx: torch.Tensor | None = None  # indices of the kept features/channels
    n_orig = 0  # their number before pruning
    layout = "features"  # "features" (last dim), "channels" (dim 1), or "flat_channels"
    for name, mod, parent, attr in leaves:
        pruned_upstream = keep_idx is not None
        if isinstance(mod, nn.Linear | nn.Conv2d):
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                raise ValueError(f"cannot shrink grouped convolution {name!r}")
            cols = None
            if pruned_upstream:
                if isinstance(mod, nn.Linear) and layout == "flat_channels":
                    if mod.in_features % n_orig:
                        raise ValueError(
                            f"cannot map the flattened channels onto {name!r}: in_features "
                            f"{mod.in_features} is not a multiple of {n_orig} channels"
                        )
                    hw = mod.in_features // n_orig
                    base = keep_idx.unsqueeze(1) * hw
                    cols = (base + torch.arange(hw, device=base.device)).reshape(-1)
                elif _direct_input(mod, layout):
                    cols = keep_idx
                else:
                    raise ValueError(
                        f"cannot shrink the inputs of {name!r}: its input is laid out as "
                        f"{layout!r} after pruned units (a Flatten is missing or misplaced)"
                    )
            keep = _kept_units(name, mod, masks)
            is_last = name == layer_names[-1]
            if is_last and not bool(keep.all()):
                raise ValueError(
                    f"unit masks remove outputs of the last layer {name!r}; that would change "
                    "the model's output size (prune with prune_output_layer=False)"
                )
            rows = torch.nonzero(keep).squeeze(1)
            build = _new_linear if isinstance(mod, nn.Linear) else _new_conv
            setattr(parent, attr, build(mod, rows, cols))
            n_out = keep.numel()
            keep_idx, n_orig = (None, 0) if bool(keep.all()) else (rows, n_out)
            layout = "features" if isinstance(mod, nn.Linear) else "channels"
        elif isinstance(mod, nn.Flatten):
            if pruned_upstream and layout == "channels":
                if mod.start_dim != 1 or mod.end_dim != -1:
                    raise ValueError(f"cannot shrink through {name!r}: only Flatten(1, -1)")
                layout = "flat_channels"
            elif layout == "channels":
                layout = "features"
        elif isinstance(mod, _ZERO_PRESERVING):
            continue
        elif pruned_upstream:
            raise ValueError(
                f"cannot shrink through module {name!r} ({type(mod).__name__}): removed units "
                "would not stay exactly zero or independent there"
            )
        elif any(True for _ in mod.parameters()):
            raise ValueError(
                f"module {name!r} ({type(mod).__name__}) holds parameters compress cannot handle"
            )
    return new_model


def _compress_units_checked(
    model: nn.Module, masks: dict[str, torch.Tensor], example_inputs
) -> nn.Module:
    """Unit compression, always checked against the masked model on a probe batch.

    Plain Sequential stacks are shrunk layer by layer; anything else (residual models,
    transformers, Sequential subclasses with their own ``forward``) is traced.
    """
    if is_plain_chain(model):
        small = _compress_units(model, masks)
    else:
        if example_inputs is None:
            example_inputs = default_inputs(model)
        if example_inputs is None:
            raise ValueError(
                "compress needs example_inputs (a batch the model accepts) to trace this "
                f"model: {_why_traced(model)}, so its coupled channels must be found by "
                "tracing"
            )
        small = compress_traced(model, masks, example_inputs)
    probe = example_inputs if example_inputs is not None else default_inputs(model)
    if probe is None:
        raise ValueError(
            "compress cannot build a probe batch for this model (its input size is not "
            "known); pass example_inputs"
        )
    check_equivalent(model, masks, small, probe)
    return small


def _why_traced(model: nn.Module) -> str:
    from spamkern.pruning.groups import custom_forward

    custom = custom_forward(model)
    if custom is not None:
        return f"{custom!r} overrides Sequential.forward (e.g. a skip connection)"
    return f"it is a {type(model).__name__}, not a plain nn.Sequential stack"


RTOL = 1e-5


@torch.no_grad()
def check_equivalent(
    model: nn.Module, masks: dict[str, torch.Tensor], small: nn.Module, probe, rtol: float = RTOL
) -> float:
    """Relative difference of ``small`` and the masked ``model`` on ``probe`` (eval mode);
    a ValueError when it exceeds ``rtol``."""
    from spamkern.pruning.groups import _call

    masked = apply_masks(copy.deepcopy(model), masks).eval()
    was_training = small.training
    small.eval()
    try:
        want, got = _call(masked, probe), _call(small, probe)
    except Exception as err:
        raise ValueError(
            f"the compressed model fails on the probe batch ({type(err).__name__}: {err}); "
            "some operation between coupled layers is not channel-wise (e.g. a reshape that "
            "mixes channels, or attention heads not declared with register_attention)"
        ) from err
    finally:
        small.train(was_training)
    want = torch.cat([w.reshape(-1) for w in (want if isinstance(want, tuple | list) else [want])])
    got = torch.cat([g.reshape(-1) for g in (got if isinstance(got, tuple | list) else [got])])
    if want.shape != got.shape:
        raise ValueError(
            f"the compressed model's output has {got.numel()} entries on the probe batch, the "
            f"masked model's {want.numel()}"
        )
    err = float((got - want).norm() / want.norm().clamp(min=torch.finfo(want.dtype).tiny))
    if not err <= rtol:
        raise ValueError(
            f"the compressed model differs from the masked model by {err:.3g} (relative, "
            f"limit {rtol:g}) on the probe batch: some operation between coupled layers does "
            "not keep removed channels at exactly zero (e.g. an offset added after them, or "
            "a reduction across channels); refusing to return a wrong model"
        )
    return err


def _removable_units(family, masks: dict, float_masks: dict, ones: dict) -> torch.Tensor:
    """Indices of the family's units whose producers are all masked out; a ValueError for
    units masked only in part of their coupled producers, or that cannot go exactly."""
    from spamkern.pruning.groups import unit_values

    kept, _ = unit_values(family, {n: float_masks.get(n, ones[n]) for n in ones})
    full, _ = unit_values(family, ones)
    partial = torch.nonzero((kept > 0) & (kept < full)).squeeze(1)
    gone = torch.nonzero(kept == 0).squeeze(1)
    where = f"the coupled channel group rooted at {family.root!r}"
    if len(partial) and family.unit == 1 and family.reason is None and not family.is_output:
        missing = sorted({s.param for s in family.producers} - set(masks))
        raise ValueError(
            f"masks remove only part of unit(s) {partial[:5].tolist()} of {where}: all of "
            f"{sorted(family.producer_params())} must be masked together (not masked: "
            f"{missing or 'none, but rows are partly masked'}); prune with "
            "pattern='unit' and example_inputs to mask whole coupled groups"
        )
    if (len(gone) or len(partial)) and family.reason is not None:
        raise ValueError(
            f"masks remove channels of {where}, which cannot go exactly: {family.reason}"
        )
    if len(gone) and family.is_output:
        raise ValueError(f"masks remove outputs of {where}; that would change the output size")
    return gone


def compress_traced(model: nn.Module, masks: dict[str, torch.Tensor], example_inputs) -> nn.Module:
    """Remove every coupled channel group whose producers are all masked out, with
    Torch-Pruning's pruning functions on a masked copy of ``model`` (not yet checked)."""
    from spamkern.pruning.groups import build_graph, channel_families

    small = apply_masks(copy.deepcopy(model), masks)
    grad_flags = {n: p.requires_grad for n, p in small.named_parameters()}
    dg = build_graph(small, example_inputs)
    families = channel_families(small, example_inputs, dg)
    float_masks = {n: m.to(torch.float64) for n, m in masks.items()}
    ones = {n: torch.ones(()).expand(p.shape) for n, p in small.named_parameters()}
    modules = dict(small.named_modules())
    reached = set().union(*(f.producer_params() for f in families))
    unreached = sorted(n for n, m in masks.items() if n not in reached and not bool(m.all()))
    if unreached:
        raise ValueError(
            f"masks remove entries of parameters that produce no coupled group of the traced "
            f"model: {unreached} (the trace on example_inputs did not reach them as channel "
            "producers, e.g. a detached branch or an unsupported layer)"
        )
    for f in families:
        gone = _removable_units(f, masks, float_masks, ones)
        if len(gone) == 0:
            continue
        if len(gone) == f.n_units:
            gone = gone[1:]  # never empty a layer: the masked copy keeps one zero unit
        channels = (gone.unsqueeze(1) * f.unit + torch.arange(f.unit)).reshape(-1)
        root = modules[f.root]
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, channels.tolist())
        group.prune()
    for n, p in small.named_parameters():
        p.requires_grad_(grad_flags.get(n, True))
    return small


def _is_unit_mask(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    for m in masks.values():
        if m.ndim >= 2:
            rows = m.reshape(m.shape[0], -1)
            if not bool((rows.all(dim=1) == rows.any(dim=1)).all()):
                return False
    return True


def compress(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    pattern: str | None = None,
    block: tuple[int, int] | None = None,
    example_inputs: torch.Tensor | tuple | None = None,
) -> nn.Module:
    """A new model equivalent to ``model`` with ``masks`` applied, as small/fast as the
    pattern allows (see the module docs). ``model`` itself is not modified.

    ``pattern`` and ``block`` default to what :func:`spamkern.pruning.prune` recorded on
    the masks; plain dicts are treated as unit masks when every row is all-or-nothing.
    """
    pattern = pattern or getattr(masks, "pattern", None)
    if pattern is None:
        pattern = "unit" if _is_unit_mask(model, masks) else "unstructured"
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "unit":
        return _compress_units_checked(model, masks, example_inputs)
    if pattern == "block":
        from spamkern.sparse import convert_to_block_sparse

        block = block or getattr(masks, "block", None)
        if block is None:
            raise ValueError("block masks need the block size: pass block=(r, c)")
        dense = apply_masks(copy.deepcopy(model), masks)
        return convert_to_block_sparse(dense, masks, tuple(block))
    if pattern == "2:4":
        return _compress_two_four(model, masks)
    return apply_masks(copy.deepcopy(model), masks)


def _compress_two_four(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    from spamkern.sparse import SemiStructuredLinear

    new_model = apply_masks(copy.deepcopy(model), masks)
    targets = [
        (name, mod)
        for name, mod in new_model.named_modules()
        if isinstance(mod, nn.Linear) and f"{name}.weight" in masks
    ]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = new_model.get_submodule(parent_name) if parent_name else new_model
        if not parent_name and not attr:
            return SemiStructuredLinear.from_dense(mod, masks[f"{name}.weight"])
        setattr(parent, attr, SemiStructuredLinear.from_dense(mod, masks[f"{name}.weight"]))
    return new_model


# ---------------------------------------------------------------------------- measuring
def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (or of non-zero parameter entries)."""
    if nonzero:
        return sum(int((p != 0).sum()) for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def _sample_inputs(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int, random: bool
) -> torch.Tensor:
    """A batch of ``input_shape`` inputs: token ids below ``model.vocab_size`` when the
    model has one, else floats in the model's dtype (random or zeros)."""
    p = next(model.parameters())
    shape = (batch_size, *input_shape)
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None:
        return torch.randint(0, vocab, shape, device=p.device)
    if random:
        return torch.randn(shape, dtype=p.dtype, device=p.device)
    return torch.zeros(shape, dtype=p.dtype, device=p.device)


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one sample's forward pass, 2 per multiply–add of every matrix product and
    convolution (attention's products included), counted by ``torch.utils.flop_counter``.

    Dense counting: zeros inside a weight still count (only physical shrinking saves).
    Token models (with ``vocab_size``) are fed token ids.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = _sample_inputs(model, input_shape, 1, random=False)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 256,
    repeats: int = 30,
    threads: int = 1,
) -> float:
    """Median wall time in milliseconds of one forward pass on the CPU with ``threads``
    (random inputs; random token ids for models with ``vocab_size``)."""
    x = _sample_inputs(model, input_shape, batch_size, random=True)
    old_threads = torch.get_num_threads()
    was_training = model.training
    torch.set_num_threads(threads)
    model.eval()
    try:
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    return 1e3 * statistics.median(times)


def compression_report(
    before: nn.Module,
    after: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 256,
    repeats: int = 30,
) -> dict[str, float]:
    """Parameters, FLOPs and CPU latency (1 thread, median) before and after compression."""
    return {
        "params_before": count_params(before),
        "params_after": count_params(after),
        "flops_before": count_flops(before, input_shape),
        "flops_after": count_flops(after, input_shape),
        "latency_ms_before": measure_latency(before, input_shape, batch_size, repeats),
        "latency_ms_after": measure_latency(after, input_shape, batch_size, repeats),
    }
