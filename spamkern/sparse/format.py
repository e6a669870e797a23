"""Block-sparse weight format shared by every sparse kernel (torch, Triton, C++, CUDA).

A weight W of shape (N, K) = (out, in) is cut into blocks of (bn, bk). Only kept blocks are
stored, block-row by block-row (BSR):

* ``row_ptr``  (N/bn + 1,) int32 — the blocks of block-row i are ``row_ptr[i]:row_ptr[i+1]``;
* ``col_idx``  (nnzb,) int32     — block-column of each stored block, ascending per row;
* ``blocks_t`` (nnzb, bk, bn)    — each block **pre-transposed** (Wblockᵀ), contiguous, so a
  kernel multiplies an x tile (m, bk) by it directly and reads it with unit stride along n;
* ``row_order`` (N/bn,) int32    — block-rows sorted by decreasing block count: kernels
  schedule the heaviest rows first (longest-processing-time first balances the load).

N and K need not be multiples of the block: the last block-row/column is zero-padded in
``blocks_t`` and kernels bound their loads and stores by N and K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZES = (16, 32, 64, 128)  # powers of two: Triton tiles need them


def check_block(block: tuple[int, int] | int) -> tuple[int, int]:
    """Normalise ``block`` to ``(bn, bk)``; each side one of 16, 32, 64, 128 (rectangular ok)."""
    if isinstance(block, int):
        block = (block, block)
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or any(not isinstance(b, int) or b not in BLOCK_SIZES for b in block)
    ):
        raise ValueError(
            f"block must be (out, in) with each side one of {BLOCK_SIZES}, got {block!r}"
        )
    return int(block[0]), int(block[1])


def _block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    n, k = shape
    bn, bk = block
    return -(-n // bn), -(-k // bk)


def _padded(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    nb, kb = _block_grid(tuple(weight.shape), block)
    pad_n, pad_k = nb * block[0] - weight.shape[0], kb * block[1] - weight.shape[1]
    if pad_n or pad_k:
        weight = torch.nn.functional.pad(weight, (0, pad_k, 0, pad_n))
    return weight


def block_mask_from(
    weight: torch.Tensor, block: tuple[int, int], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(N/bn, K/bk) bool block mask.

    ``mask`` may be an element mask shaped like ``weight`` (a block is kept when any of its
    entries is kept), a block mask shaped like the block grid, or None (a block is kept when
    any of its weights is non-zero).
    """
    grid = _block_grid(tuple(weight.shape), block)
    if mask is None:
        elem = weight != 0
    elif mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = kept), got dtype {mask.dtype}")
    elif tuple(mask.shape) == grid:
        return mask.to(weight.device)
    elif mask.shape == weight.shape:
        elem = mask.to(weight.device)
    else:
        raise ValueError(
            f"mask must have the weight's shape {tuple(weight.shape)} or the block grid's "
            f"shape {grid} for block {block}, got {tuple(mask.shape)}"
        )
    padded = _padded(elem, block)
    bn, bk = block
    return padded.reshape(grid[0], bn, grid[1], bk).any(dim=3).any(dim=1)


@dataclass(frozen=True)
class BlockSparseWeight:
    """A (N, K) weight in BSR form with pre-transposed blocks (see module docstring)."""

    shape: tuple[int, int]
    block: tuple[int, int]
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    blocks_t: torch.Tensor
    row_order: torch.Tensor

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        block: tuple[int, int] | int = (64, 64),
        mask: torch.Tensor | None = None,
    ) -> BlockSparseWeight:
        """Pack ``weight`` keeping the blocks that ``mask`` keeps (see :func:`block_mask_from`).

        An element mask also zeroes the dropped entries inside kept blocks, so the packed
        weight always equals ``weight * mask``.
        """
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        block = check_block(block)
        weight = weight.detach()
        bmask = block_mask_from(weight, block, mask)
        if mask is not None and mask.shape == weight.shape:
            weight = weight * mask.to(weight.device)
        nb, kb = bmask.shape
        bn, bk = block
        tiles = _padded(weight, block).reshape(nb, bn, kb, bk).permute(0, 2, 3, 1)  # nb,kb,bk,bn
        rows, cols = bmask.nonzero(as_tuple=True)  # row-major order: rows ascending
        blocks_t = tiles[rows, cols].contiguous()
        counts = bmask.sum(dim=1)
        row_ptr = torch.zeros(nb + 1, dtype=torch.int32, device=weight.device)
        row_ptr[1:] = counts.cumsum(0)
        row_order = torch.sort(counts, descending=True, stable=True).indices.to(torch.int32)
        return cls(
            shape=(int(weight.shape[0]), int(weight.shape[1])),
            block=block,
            row_ptr=row_ptr,
            col_idx=cols.to(torch.int32).contiguous(),
            blocks_t=blocks_t,
            row_order=row_order,
        )

    @property
    def nnz_blocks(self) -> int:
        return int(self.col_idx.numel())

    @property
    def block_grid(self) -> tuple[int, int]:
        return _block_grid(self.shape, self.block)

    @property
    def density(self) -> float:
        """Fraction of blocks kept (1.0 = dense)."""
        nb, kb = self.block_grid
        return self.nnz_blocks / max(1, nb * kb)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks_t.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks_t.device

    def block_mask(self) -> torch.Tensor:
        nb, kb = self.block_grid
        out = torch.zeros(nb, kb, dtype=torch.bool, device=self.device)
        rows = torch.repeat_interleave(
            torch.arange(nb, device=self.device), (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        )
        out[rows, self.col_idx.long()] = True
        return out

    def to_dense(self) -> torch.Tensor:
        """The (N, K) dense weight (zeros where blocks were dropped)."""
        nb, kb = self.block_grid
        bn, bk = self.block
        tiles = torch.zeros(nb, kb, bk, bn, dtype=self.dtype, device=self.device)
        mask = self.block_mask()
        tiles[mask] = self.blocks_t
        dense = tiles.permute(0, 3, 1, 2).reshape(nb * bn, kb * bk)
        return dense[: self.shape[0], : self.shape[1]].contiguous()

    def to(self, *args, **kwargs) -> BlockSparseWeight:
        """Move/cast the blocks (indices follow the device only)."""
        blocks = self.blocks_t.to(*args, **kwargs)
        dev = blocks.device
        return BlockSparseWeight(
            self.shape,
            self.block,
            self.row_ptr.to(dev),
            self.col_idx.to(dev),
            blocks,
            self.row_order.to(dev),
        )
