"""The C++ CPU kernel (spamkern._C) against F.linear with the masked dense weight."""

from __future__ import annotations

import pytest
import torch
from sparse_helpers import TOL, make_case, rel_err

from spamkern import _ext
from spamkern.sparse import BlockSparseWeight, bsr_linear

assert _ext.AVAILABLE, f"spamkern._C is required: {_ext.LOAD_ERROR}"

BLOCKS = [(16, 16), (32, 64), (64, 64), (128, 32), (128, 128), (16, 128)]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m", [1, 7, 37])
def test_matches_masked_dense(block, m):
    seed = 1000 * block[0] + 10 * block[1] + m
    x, w, b, ref = make_case(203, 301, m, block, 0.4, torch.float32, seed)
    y = bsr_linear(x, w, b, backend="cpp")
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    x, w, b, ref = make_case(150, 200, 21, (32, 64), 0.5, dtype, 17)
    y = bsr_linear(x, w, b, backend="cpp")
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_all_zero_and_fully_dense_weights(density, bias):
    x, w, b, ref = make_case(130, 96, 13, (32, 32), density, torch.float32, 7, bias=bias)
    y = bsr_linear(x, w, b, backend="cpp")
    if density == 0.0:
        expect = b.expand(13, -1) if bias else torch.zeros(13, 130)
        torch.testing.assert_close(y, expect, rtol=0, atol=0)
    else:
        assert rel_err(y, ref) < 1e-5


def test_batched_input_and_both_thread_counts():
    x, w, b, ref = make_case(256, 192, 131, (64, 32), 0.3, torch.float32, 11)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(bsr_linear(x.reshape(1, 131, 192), w, b, backend="cpp")[0])
    finally:
        torch.set_num_threads(before)
    for y in results:
        assert rel_err(y, ref) < 1e-5
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_wide_layer_many_tasks():
    x, w, b, ref = make_case(1000, 520, 97, (64, 64), 0.15, torch.float32, 5)
    assert rel_err(bsr_linear(x, w, b, backend="cpp"), ref) < 1e-5


def test_opcheck_and_compile():
    x, w, b, ref = make_case(70, 64, 9, (16, 32), 0.5, torch.float32, 3)
    args = (x, w.row_ptr, w.col_idx, w.blocks_t, w.row_order, b, 70)
    torch.library.opcheck(torch.ops.spamkern.bsr_linear.default, args)

    def f(x):
        return torch.relu(torch.ops.spamkern.bsr_linear(x, *args[1:]))

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y.double(), torch.relu(ref), rtol=1e-5, atol=1e-5)


def test_rejects_wrong_dtype_and_shapes():
    w = BlockSparseWeight.from_dense(torch.randn(32, 32), 16)
    args = (w.row_ptr, w.col_idx, w.blocks_t, w.row_order, None)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.spamkern.bsr_linear(torch.randn(4, 32, dtype=torch.float64), *args, 32)
    w64 = BlockSparseWeight.from_dense(torch.randn(32, 32, dtype=torch.float64), 16)
    args64 = (w64.row_ptr, w64.col_idx, w64.blocks_t, w64.row_order, None)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.spamkern.bsr_linear(torch.randn(4, 32, dtype=torch.float64), *args64, 32)
    with pytest.raises(RuntimeError, match="row_ptr"):
        torch.ops.spamkern.bsr_linear(torch.randn(4, 32), *args, 64)
    with pytest.raises(ValueError, match="in_features"):
        bsr_linear(torch.randn(4, 31), w)
