"""Which parameter tensor gets which curvature block.

Under ``structure="kron"`` these tensors get Kronecker factors in laplace-torch's layout — a
weight ``[G, A]``, a bias ``[G]``:

* ``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` (any stride, padding,
  dilation and padding mode): one Kronecker block per weight;
* grouped and depthwise ``nn.Conv1d``/``nn.Conv2d``: the weight (out, in/g, k…) is
  block-diagonal over the g groups, group j's rows get G_j ⊗ A_j; the factors are stacked,
  G (g, out/g, out/g), A (g, in/g·k…, in/g·k…), and the bias gets G (g, out/g, out/g);
* ``nn.MultiheadAttention``: the packed ``in_proj_weight`` (3E, E) is three row slices (q, k,
  v), each with its own G and the A of its own input (query, key, value), stacked as
  G (3, E, E), A (3, E, E); ``in_proj_bias`` gets G (3, E, E); separate ``q/k/v_proj_weight``
  (kdim/vdim ≠ E) get one block each; ``out_proj`` is a Linear.

Every other trainable tensor (LayerNorm, BatchNorm, Embedding, a bare ``nn.Parameter``, the
``bias_k``/``bias_v`` of attention, ...) gets an *exact* diagonal block, and so does a weight
shared by several modules (tied weights, ``l2.weight = l1.weight``): its per-sample gradient
is the sum over the modules' uses, which has no Kronecker factorisation of the usual kind, so
its exact diagonal comes from per-sample gradients through all uses at once. Layers that
would want a factorisation spamkern does not implement (transposed and 3-D convolutions) are
refused with an error, never approximated silently. Under ``structure="diag"`` every tensor
gets an exact diagonal block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

STRUCTURES = ("kron", "diag")
_KRON_REFUSED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONVS = (nn.Conv1d, nn.Conv2d)

# the four linear maps inside nn.MultiheadAttention whose outputs the curvature pass records
ATTENTION_SITES = ("q", "k", "v", "out")
# parameter name inside the attention module -> the sites its rows belong to, in row order
_ATTENTION_ROLES = {
    "in_proj_weight": ("q", "k", "v"),
    "in_proj_bias": ("q", "k", "v"),
    "q_proj_weight": ("q",),
    "k_proj_weight": ("k",),
    "v_proj_weight": ("v",),
    "out_proj.weight": ("out",),
    "out_proj.bias": ("out",),
}


@dataclass
class ParamBlock:
    """One trainable parameter tensor and how its curvature is represented."""

    name: str
    param: nn.Parameter
    module: nn.Module  # the hooked module (the attention module for its projections)
    module_name: str
    kind: str  # "kron" (Kronecker factors) or "diag" (exact diagonal)
    role: str  # "weight"/"bias" of a Linear/conv, an attention parameter's name, or "other"
    offset: int  # start in the flat (P,) parameter vector
    via_hooks: bool  # curvature from layer inputs/output gradients, else per-sample autograd

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def sites(self) -> tuple[str, ...]:
        """The recorded linear maps whose outputs this tensor's rows belong to, in row order
        ("main" for a Linear/conv; q/k/v/out for attention)."""
        return _ATTENTION_ROLES.get(self.role, ("main",))

    @property
    def has_input_factor(self) -> bool:
        """Whether the block has an A factor (a weight) or only G (a bias)."""
        return self.role == "weight" or self.role.endswith("weight")

    @property
    def row_slices(self) -> int:
        """Row slices with their own Kronecker block (conv groups, packed q/k/v), else 1."""
        if isinstance(self.module, CONVS):
            return self.module.groups
        return len(self.sites)


def hookable(module: nn.Module) -> bool:
    """Whether the module's curvature comes from its inputs and output gradients (hooks)."""
    return isinstance(module, (nn.Linear, *CONVS))


def _check_kron_supported(module: nn.Module, module_name: str) -> None:
    """Refuse layers that want a Kronecker factorisation spamkern does not implement."""
    if isinstance(module, _KRON_REFUSED):
        raise ValueError(
            f"module {module_name!r} ({type(module).__name__}) has no Kronecker factorisation "
            "in spamkern (Linear, Conv1d, Conv2d and MultiheadAttention have one); freeze its "
            "parameters (requires_grad=False) or use structure='diag'"
        )


def _owners(model: nn.Module) -> tuple[dict[int, int], dict[int, nn.MultiheadAttention]]:
    """How many distinct modules hold each parameter, and the attention module that owns each
    ``out_proj`` (whose forward attention never calls: its maps are recorded on the parent)."""
    holders: dict[int, set[int]] = {}
    attention_of: dict[int, nn.MultiheadAttention] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(module))
        if isinstance(module, nn.MultiheadAttention):
            attention_of[id(module.out_proj)] = module
    return {key: len(value) for key, value in holders.items()}, attention_of


def _placement(module, local_name, attention_of, structure) -> tuple[nn.Module, str, bool]:
    """(hooked module, role, via_hooks) of one parameter of ``module``."""
    if id(module) in attention_of:  # out_proj of an attention module
        hooked = structure == "kron"
        return attention_of[id(module)], (f"out_proj.{local_name}" if hooked else "other"), hooked
    if isinstance(module, nn.MultiheadAttention):
        # exact diagonals of attention come from per-sample gradients (no hook needed)
        hooked = local_name in _ATTENTION_ROLES and structure == "kron"
        return module, (local_name if hooked else "other"), hooked
    if hookable(module) and local_name in ("weight", "bias"):
        return module, local_name, True
    return module, "other", False


def parameter_blocks(model: nn.Module, structure: str) -> list[ParamBlock]:
    """Blocks for every trainable tensor, in ``model.parameters()`` order."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    owners, attention_of = _owners(model)
    blocks: list[ParamBlock] = []
    seen: set[int] = set()
    offset = 0
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                seen.add(id(param))
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            if structure == "kron":
                _check_kron_supported(module, module_name)
            hooked, role, via_hooks = _placement(module, local_name, attention_of, structure)
            if owners[id(param)] > 1:  # tied weights: the exact diagonal through all uses
                hooked, role, via_hooks = module, "other", False
            blocks.append(
                ParamBlock(
                    name=name,
                    param=param,
                    module=hooked,
                    module_name=module_name,
                    kind="kron" if via_hooks and structure == "kron" else "diag",
                    role=role,
                    via_hooks=via_hooks,
                    offset=offset,
                )
            )
            offset += param.numel()
    if not blocks:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
    return blocks
