"""Whole-model conversion: every masked nn.Linear becomes a BlockSparseLinear.

``sk.compress`` calls :func:`convert_to_block_sparse` for block masks. Masks are a dict
parameter name → bool tensor (True = kept), as everywhere in spamkern; a Linear whose
``<name>.weight`` has a mask is converted, every other module is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from spamkern.sparse.format import check_block
from spamkern.sparse.layer import BlockSparseLinear


def convert_to_block_sparse(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    block: tuple[int, int] | int = (64, 64),
    mode: str = "auto",
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace=True``) whose masked Linear
    layers are block-sparse. A mask may be an element mask (a block is kept when any of its
    entries is kept) or a block mask of the block grid's shape. Bias masks are applied to
    the bias (pruned entries set to zero)."""
    block = check_block(block)
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    weight_masks = {}
    for name, mask in masks.items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None or leaf not in ("weight", "bias"):
            raise ValueError(f"mask {name!r} names no parameter of the model")
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"mask {name!r} belongs to a {type(module).__name__}; block-sparse conversion "
                "handles nn.Linear only (use unit or unstructured pruning for other layers)"
            )
        if leaf == "weight":
            weight_masks[owner] = mask
    target = model if inplace else copy.deepcopy(model)
    target_modules = dict(target.named_modules())
    for owner, mask in weight_masks.items():
        linear = target_modules[owner]
        bias_mask = masks.get(f"{owner}.bias") if owner else masks.get("bias")
        if bias_mask is not None and linear.bias is not None:
            with torch.no_grad():
                linear.bias.mul_(bias_mask.to(linear.bias.device, linear.bias.dtype))
        sparse = BlockSparseLinear.from_dense(linear, block, mask, mode=mode)
        _set_submodule(target, owner, sparse)
    return target


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError(
            "the model itself is a Linear: convert it with BlockSparseLinear.from_dense"
        )
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
