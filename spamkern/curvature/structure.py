"""Which parameter tensor gets which curvature block.

Under ``structure="kron"`` the weight of an ``nn.Linear`` or a groups=1 ``nn.Conv2d`` gets
Kronecker factors (G, A) and its bias the single factor (G,), exactly laplace-torch's layout.
Every other trainable tensor (LayerNorm, BatchNorm, Embedding, a bare ``nn.Parameter``, ...)
gets an *exact* diagonal block, so models that laplace-torch refuses still work. Layers that
would want a Kronecker factorisation spamkern does not implement (grouped convolutions, other
convolution ranks, transposed convolutions) are refused with an error, never approximated
silently. Under ``structure="diag"`` every tensor gets an exact diagonal block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

STRUCTURES = ("kron", "diag")
_KRON_REFUSED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class ParamBlock:
    """One trainable parameter tensor and how its curvature is represented."""

    name: str
    param: nn.Parameter
    module: nn.Module
    module_name: str
    kind: str  # "kron" (Linear/Conv2d weight or bias) or "diag" (exact diagonal)
    role: str  # "weight"/"bias" of a Linear or Conv2d, or "other"
    offset: int  # start in the flat (P,) parameter vector
    via_hooks: bool  # curvature from layer inputs/output gradients, else per-sample autograd

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape


def hookable(module: nn.Module) -> bool:
    """Whether the module's curvature comes from its inputs and output gradients (hooks)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _check_kron_supported(module: nn.Module, module_name: str) -> None:
    """Refuse layers that want a Kronecker factorisation spamkern does not implement."""
    if isinstance(module, nn.Conv2d) and not hookable(module):
        raise ValueError(
            f"module {module_name!r} (Conv2d with groups={module.groups}, padding_mode="
            f"{module.padding_mode!r}) has no Kronecker factorisation in spamkern (groups=1 and "
            "padding_mode='zeros' only); freeze its parameters (requires_grad=False) or use "
            "structure='diag'"
        )
    if isinstance(module, _KRON_REFUSED):
        raise ValueError(
            f"module {module_name!r} ({type(module).__name__}) has no Kronecker factorisation "
            "in spamkern; freeze its parameters (requires_grad=False) or use structure='diag'"
        )


def parameter_blocks(model: nn.Module, structure: str) -> list[ParamBlock]:
    """Blocks for every trainable tensor, in ``model.parameters()`` order."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
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
            via_hooks = hookable(module) and local_name in ("weight", "bias")
            role = local_name if via_hooks else "other"
            blocks.append(
                ParamBlock(
                    name=name,
                    param=param,
                    module=module,
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
