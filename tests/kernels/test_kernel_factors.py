"""Triton Gram / implicit-im2col kernels against float64 matrix products of fresh data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, rel_err

from spamkern import dispatch
from spamkern.ops import conv_patch_gram, gram

# tolerance per operand type: float32 must be ≤ 1e-5 (IEEE products), float16 operands are
# rounded on input (the float64 reference sees the rounded values, so fp32 accuracy applies)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-5}
DTYPES = [torch.float32, torch.float64, torch.float16]


def _sym(d: int, dtype: torch.dtype) -> torch.Tensor:
    m = torch.randn(d, d, dtype=torch.float64, device=DEVICE)
    return (m + m.T).to(dtype)


def _small_gpu_config(n_rows, d, dtype, device):
    """A GPU-like launch (several tiles, split-K with atomics) small enough to interpret."""
    return 32, 64, 3, 4, 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d"), [(301, 77), (97, 300)])
def test_gram_accumulates_into_out(triton_backend, dtype, n, d):
    x = torch.randn(n, d, dtype=dtype, device=DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = _sym(d, acc)
    alpha = float(torch.rand(()) + 0.1)
    expected = out.double() + alpha * x.double().T @ x.double()
    result = gram(x, out, alpha)
    assert result is out
    assert rel_err(result, expected) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_split_k_and_mirrored_tiles(triton_backend, monkeypatch, dtype):
    """Off-diagonal tiles are mirrored and split-K partial sums all arrive (atomics)."""
    monkeypatch.setattr(triton_backend.factors, "_launch_config", _small_gpu_config)
    x = torch.randn(389, 83, dtype=dtype, device=DEVICE)  # 3 tiles of 32, 3 row splits
    expected = 0.5 * x.double().T @ x.double()
    result = gram(x, None, 0.5)
    assert result.dtype == dtype
    assert rel_err(result, expected) <= TOL[dtype]
    assert _asymmetry_in_rounding_units(result, x, 0.5) <= 8


def _asymmetry_in_rounding_units(result: torch.Tensor, x: torch.Tensor, alpha: float) -> float:
    """max |R − Rᵀ| in units of eps · alpha·(|x|ᵀ|x|), entrywise.

    Split-K atomics add the partial sums in whatever order the hardware serves them, so the
    two mirrored halves of a tile may differ by rounding: a few eps of the sum of the
    magnitudes of the products. A real bug (a lost split, a wrongly mirrored tile) is off by
    a whole partial sum, millions of such units in float32.
    """
    eps = torch.finfo(result.dtype).eps
    scale = alpha * x.double().abs().T @ x.double().abs()
    gap = (result.double() - result.double().T).abs()
    return float((gap / (eps * scale).clamp_min(torch.finfo(torch.float64).tiny)).max())


def test_asymmetry_check_catches_a_lost_split():
    """The symmetry check still fails for a tile that missed one split's partial sum."""
    x = torch.randn(389, 83, dtype=torch.float64)
    full = 0.5 * x.T @ x
    broken = full.clone()
    part = 0.5 * x[:130].T @ x[:130]  # the first row split of the (32:64, 0:32) tile
    broken[32:64, :32] -= part[32:64, :32]
    assert _asymmetry_in_rounding_units(full, x, 0.5) <= 8
    assert _asymmetry_in_rounding_units(broken, x, 0.5) > 1e6


def test_gram_new_matrix_is_float32_for_half_inputs(triton_backend):
    x = torch.randn(65, 19, dtype=torch.float16, device=DEVICE)
    result = gram(x)
    assert result.dtype == torch.float32
    assert rel_err(result, x.double().T @ x.double()) <= 1e-5


def test_gram_non_contiguous_rows(triton_backend):
    """Row and column strides of views are honoured (no hidden .contiguous() needed)."""
    transposed = torch.randn(47, 200, device=DEVICE).T[::2]  # (100, 47), strides (2, 200)
    every_other = torch.randn(50, 94, device=DEVICE)[:, ::2]  # (50, 47), column stride 2
    for x in (transposed, every_other):
        assert rel_err(gram(x), x.double().T @ x.double()) <= 1e-5


# (kernel, stride, padding, dilation, input H×W)
CONV_CASES = [
    ((3, 3), (1, 1), (1, 1), (1, 1), (13, 11)),
    ((2, 3), (2, 1), (0, 2), (2, 1), (9, 14)),
    ((5, 1), (3, 2), (2, 0), (1, 3), (17, 10)),
    ((1, 1), (1, 1), (0, 0), (1, 1), (7, 5)),
]


def _unfold_gram(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    u = F.unfold(x.double(), kernel, dilation=dilation, padding=padding, stride=stride)
    u = u.transpose(1, 2).reshape(-1, u.shape[1])
    return u.T @ u


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "hw"), CONV_CASES)
def test_conv_patch_gram_matches_unfold(
    triton_backend, dtype, kernel, stride, padding, dilation, hw
):
    channels = int(torch.randint(2, 6, ()))
    x = torch.randn(3, channels, *hw, dtype=dtype, device=DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d = channels * kernel[0] * kernel[1]
    out = _sym(d, acc)
    alpha = 1.0 / 7.0
    expected = out.double() + alpha * _unfold_gram(x, kernel, stride, padding, dilation)
    result = conv_patch_gram(x, kernel, stride, padding, dilation, out=out, alpha=alpha)
    assert result is out
    assert rel_err(result, expected) <= TOL[dtype]


def test_conv_patch_gram_split_k_channels_last(triton_backend, monkeypatch):
    """Several tiles and row splits, on a channels-last (non-contiguous) input."""
    monkeypatch.setattr(triton_backend.factors, "_launch_config", _small_gpu_config)
    x = torch.randn(2, 9, 10, 11, device=DEVICE).to(memory_format=torch.channels_last)
    expected = _unfold_gram(x, (3, 3), (2, 1), (1, 2), (1, 2))
    result = conv_patch_gram(x, (3, 3), (2, 1), (1, 2), (1, 2))
    assert rel_err(result, expected) <= 1e-5


def test_conv_without_output_positions_is_an_error(triton_backend):
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="no output positions"):
        conv_patch_gram(x, (5, 5))


def test_dispatch_picks_triton_only_when_asked_on_cpu(triton_backend, monkeypatch):
    x = torch.randn(4, 3, device=DEVICE)
    assert dispatch.select_impl("gram", x) is triton_backend.factors.gram_triton
    monkeypatch.setenv("SPAMKERN_BACKEND", "torch")
    assert dispatch.select_impl("gram", x) is not triton_backend.factors.gram_triton
    monkeypatch.setenv("SPAMKERN_BACKEND", "auto")
    auto = dispatch.select_impl("gram", x)
    assert (auto is triton_backend.factors.gram_triton) == (DEVICE.type == "cuda")


def test_custom_ops_pass_opcheck(triton_backend):
    """Schema, fake (meta) implementation and mutation annotations are consistent."""
    x = torch.randn(37, 11, device=DEVICE)
    out = torch.zeros(11, 11, device=DEVICE)
    torch.library.opcheck(torch.ops.spamkern.triton_gram_.default, (x, out, 0.5))
    xc = torch.randn(2, 3, 6, 5, device=DEVICE)
    outc = torch.zeros(12, 12, device=DEVICE)
    args = (xc, outc, [2, 2], [1, 2], [1, 0], [1, 1], 1.0)
    torch.library.opcheck(torch.ops.spamkern.triton_conv_patch_gram_.default, args)


def test_gram_traces_under_torch_compile(triton_backend):
    """The mutating custom op survives functionalisation (aot_eager) in one graph."""
    compiled = torch.compile(backend="aot_eager", fullgraph=True)(
        lambda x, out: (torch.ops.spamkern.triton_gram_(x, out, 0.25), out * 2.0)[1]
    )
    x = torch.randn(53, 21, device=DEVICE)
    out = _sym(21, torch.float32)
    updated = out.double() + 0.25 * x.double().T @ x.double()
    assert rel_err(compiled(x, out), 2.0 * updated) <= 1e-5
    assert rel_err(out, updated) <= 1e-5  # the in-place update reached the caller's tensor


@pytest.mark.gpu  # bf16 arithmetic is wrong in the interpreter
def test_bf16_operands_accumulate_in_float32(triton_backend):
    """bf16 inputs, fp32 accumulation: exact up to fp32 sums of the rounded inputs."""
    x = torch.randn(517, 133, device=DEVICE).to(torch.bfloat16)
    xc = torch.randn(2, 5, 11, 9, device=DEVICE).to(torch.bfloat16)
    assert rel_err(gram(x), x.double().T @ x.double()) <= 1e-5
    expected = _unfold_gram(xc, (3, 3), (1, 2), (1, 1), (2, 1))
    assert rel_err(conv_patch_gram(xc, (3, 3), (1, 2), (1, 1), (2, 1)), expected) <= 1e-5
