"""The Triton kernels against F.linear with the masked dense weight.

On the CPU they run in Triton's interpreter (few, large programs keep it quick); bf16
arithmetic is upcast there, its loads and stores are still exercised.
"""

from __future__ import annotations

import pytest
import torch
from sparse_helpers import TOL, make_case, rel_err

from spamkern.dispatch import triton_usable
from spamkern.sparse import _kernels, bsr_linear

kb = _kernels.triton_module()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
assert kb is not None and triton_usable(DEVICE), "needs triton (GPU or TRITON_INTERPRET=1)"


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kb._bsr_linear_kernel, InterpretedFunction)


@pytest.fixture(autouse=True)
def _kernels_interpreted_on_cpu():
    if DEVICE.type == "cpu" and not _interpreted():
        pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "block,m", [((16, 16), 5), ((32, 64), 37), ((64, 32), 64), ((128, 128), 101)]
)
def test_matches_masked_dense(dtype, block, m):
    seed = block[0] + 7 * block[1] + m
    x, w, b, ref = make_case(150, 200, m, block, 0.45, dtype, seed, device=DEVICE)
    y = bsr_linear(x, w, b, backend="triton")
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y.cpu(), ref.cpu()) < TOL[dtype]


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_all_zero_and_fully_dense_weights(density):
    x, w, b, ref = make_case(96, 80, 19, (32, 16), density, torch.float32, 2, device=DEVICE)
    y = bsr_linear(x, w, b, backend="triton")
    assert rel_err(y.cpu(), ref.cpu()) < 1e-5
    y_nobias = bsr_linear(x, w, None, backend="triton")
    ref_nobias = ref - b.double()
    if density == 0.0:
        assert float(y_nobias.abs().max()) == 0.0
    else:
        assert rel_err(y_nobias.cpu(), ref_nobias.cpu()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [2, 3])
def test_decode_split_k(dtype, split):
    x, w, b, ref = make_case(64, 160, 11, (32, 32), 0.6, dtype, 40 + split, device=DEVICE)
    config = {"kind": "splitk", "BLOCK_M": 16, "SPLIT": split, "num_warps": 2, "num_stages": 1}
    y = kb.launch(x, w.row_ptr, w.col_idx, w.blocks_t, w.row_order, b, 64, config)
    assert y.dtype == dtype
    assert rel_err(y.cpu(), ref.cpu()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block,m", [((64, 32), 70), ((16, 128), 128)])
def test_swapped_operand_kernel(dtype, block, m):
    x, w, b, ref = make_case(140, 230, m, block, 0.4, dtype, m + block[1], device=DEVICE)
    config = {"kind": "tiled_t", "BLOCK_M": 128, "num_warps": 4, "num_stages": 1}
    y = kb.launch(x, w.row_ptr, w.col_idx, w.blocks_t, w.row_order, b, 140, config)
    assert y.dtype == dtype and rel_err(y.cpu(), ref.cpu()) < TOL[dtype]


@pytest.mark.parametrize("col_split", [2, 4])
def test_decode_column_split(col_split):
    x, w, b, ref = make_case(200, 96, 3, (64, 32), 0.5, torch.float16, col_split, device=DEVICE)
    config = {
        "kind": "tiled", "BLOCK_M": 16, "COL_SPLIT": col_split, "num_warps": 2, "num_stages": 1
    }  # fmt: skip
    y = kb.launch(x, w.row_ptr, w.col_idx, w.blocks_t, w.row_order, b, 200, config)
    assert rel_err(y.cpu(), ref.cpu()) < TOL[torch.float16]


def test_no_rows():
    x, w, b, _ = make_case(48, 32, 1, (16, 16), 0.5, torch.float32, 4, device=DEVICE)
    y = bsr_linear(x[:0], w, b, backend="triton")
    assert y.shape == (0, 48)


def test_candidate_configs_cover_decode_and_large_inputs():
    decode = kb.candidate_configs(48, 64, 64)
    assert {c["kind"] for c in decode} == {"tiled", "splitk"}
    assert {c.get("COL_SPLIT", 1) for c in decode} == {1, 2, 4}
    assert all(c["BLOCK_M"] == 64 for c in decode)
    large = kb.candidate_configs(4096, 64, 64)
    assert {c["kind"] for c in large} == {"tiled", "tiled_t"}
    assert all(c["BLOCK_M"] >= 64 for c in large)


def test_custom_op_traces():
    x, w, b, ref = make_case(64, 48, 7, (16, 16), 0.5, torch.float32, 9, device=DEVICE)
    args = (w.row_ptr, w.col_idx, w.blocks_t, w.row_order, b, 64)

    def f(x):
        return torch.ops.spamkern.bsr_linear_triton(x, *args) * 2

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(y.cpu(), 2 * ref.cpu()) < 1e-5
