"""Radix select against sorting, including ties, signs, zeros and infinities."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE

from spamkern.ops import kth_smallest
from spamkern.ops.select import segment_kth_smallest, threshold_for_sparsity


def _scores(n: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n, dtype=dtype, device=DEVICE) * 10.0 ** torch.randint(
        -3, 4, (n,), device=DEVICE
    )
    x[torch.randint(0, n, (n // 10,), device=DEVICE)] = x[0].item()  # ties
    x[: n // 50] = 0.0
    x[n // 50 : n // 25] = -0.0
    x[-3:] = torch.tensor([float("inf"), float("-inf"), 1e-40], dtype=dtype)  # denormal too
    return x[torch.randperm(n, device=DEVICE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_smallest_equals_sorted_entry(triton_backend, dtype):
    n = 70001 + int(torch.randint(0, 999, ()))
    x = _scores(n, dtype)
    ordered = torch.sort(x).values
    for k in [1, 2, n // 3, n // 2 + 1, n - 1, n, int(torch.randint(1, n + 1, ()))]:
        value = kth_smallest(x, k)
        assert value.device == x.device and value.ndim == 0
        assert value.item() == ordered[k - 1].item(), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segments_select_independently(triton_backend, dtype):
    sizes = [1, 37, 5000, 1283, 2]
    x = _scores(sum(sizes), dtype)
    ks = [1, 0, 4999, int(torch.randint(1, 1284, ())), 2]
    result = segment_kth_smallest(x, sizes, ks)
    for i, (segment, k) in enumerate(zip(torch.split(x, sizes), ks)):
        expected = float("-inf") if k == 0 else torch.sort(segment).values[k - 1].item()
        assert result[i].item() == expected, i


def test_threshold_for_sparsity_prunes_the_requested_fraction(triton_backend):
    sizes = [3001, 517, 89]
    x = torch.rand(sum(sizes), device=DEVICE)  # distinct values: the count is exact
    t = threshold_for_sparsity(x, 0.7)
    assert int((x <= t).sum()) == int(0.7 * x.numel())
    per_layer = threshold_for_sparsity(x, 0.35, sizes)
    for segment, threshold in zip(torch.split(x, sizes), per_layer):
        assert int((segment <= threshold).sum()) == int(0.35 * segment.numel())
    assert threshold_for_sparsity(x, 0.0).item() == float("-inf")


def test_select_rejects_bad_arguments(triton_backend):
    x = torch.rand(10, device=DEVICE)
    with pytest.raises(ValueError, match="sum to"):
        segment_kth_smallest(x, [4, 5], [1, 1])
    with pytest.raises(ValueError, match="k must lie"):
        segment_kth_smallest(x, [4, 6], [5, 1])
    with pytest.raises(ValueError, match="sparsity"):
        threshold_for_sparsity(x, 1.5)


def test_select_custom_op_passes_opcheck(triton_backend):
    x = torch.rand(1001, device=DEVICE)
    torch.library.opcheck(
        torch.ops.spamkern.triton_segment_kth_smallest.default, (x, [500, 501], [3, 0])
    )
