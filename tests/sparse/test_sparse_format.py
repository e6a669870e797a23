from __future__ import annotations

import pytest
import torch

from spamkern.sparse import BlockSparseWeight, block_mask_from


@pytest.mark.parametrize(
    "shape,block", [((96, 80), (16, 16)), ((130, 70), (32, 64)), ((64, 200), (128, 16))]
)
def test_element_mask_round_trip(shape, block):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen)
    mask = torch.rand(*shape, generator=gen) < 0.02  # most blocks empty, kept ones partial
    sw = BlockSparseWeight.from_dense(w, block, mask)
    torch.testing.assert_close(sw.to_dense(), w * mask, rtol=0, atol=0)
    expect = block_mask_from(w, block, mask)
    assert torch.equal(sw.block_mask(), expect)
    assert sw.nnz_blocks == int(expect.sum())
    assert sw.blocks_t.shape == (sw.nnz_blocks, block[1], block[0])


def test_blocks_are_transposed_and_rows_sorted_by_work():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=gen)
    bmask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]]).bool()
    sw = BlockSparseWeight.from_dense(w, 16, bmask)
    assert sw.row_ptr.tolist() == [0, 1, 4, 4, 6]
    assert sw.col_idx.tolist() == [0, 0, 1, 2, 1, 2]
    torch.testing.assert_close(sw.blocks_t[3], w[16:32, 32:48].T)
    counts = (sw.row_ptr[1:] - sw.row_ptr[:-1])[sw.row_order.long()]
    assert sw.row_order.tolist()[0] == 1 and bool((counts[:-1] >= counts[1:]).all())
    assert sw.density == pytest.approx(6 / 16)


def test_no_mask_keeps_nonzero_blocks():
    w = torch.zeros(48, 40)
    w[17, 33] = 2.0  # block (1, 2) of (16, 16)
    sw = BlockSparseWeight.from_dense(w, (16, 16))
    assert sw.nnz_blocks == 1 and sw.col_idx.tolist() == [2]
    torch.testing.assert_close(sw.to_dense(), w)


def test_all_zero_and_dense():
    w = torch.randn(40, 50)
    empty = BlockSparseWeight.from_dense(torch.zeros(40, 50), 16)
    assert empty.nnz_blocks == 0 and empty.to_dense().abs().sum() == 0
    full = BlockSparseWeight.from_dense(w, (32, 16))
    assert full.density == 1.0
    torch.testing.assert_close(full.to_dense(), w)


@pytest.mark.parametrize("block", [(24, 16), (16, 256), 8, (16,), "64"])
def test_bad_block_is_rejected(block):
    with pytest.raises(ValueError, match="block"):
        BlockSparseWeight.from_dense(torch.randn(32, 32), block)


def test_bad_masks_are_rejected():
    w = torch.randn(32, 32)
    with pytest.raises(TypeError, match="bool"):
        BlockSparseWeight.from_dense(w, 16, torch.ones(32, 32))
    with pytest.raises(ValueError, match="shape"):
        BlockSparseWeight.from_dense(w, 16, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseWeight.from_dense(torch.randn(4, 4, 4), 16)
