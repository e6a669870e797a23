"""float64_sum: the float64 total of float32 terms without casting every entry."""

import pytest
import torch

from spamkern.ops.reductions import float64_sum


@pytest.mark.parametrize("n", [1, 1023, 1024, 200_704 + 17])
def test_float64_sum_matches_the_exact_total_of_float32_terms(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 10 + 3  # log terms of a posterior: size ~10
    exact = x.double().sum()
    got = float64_sum(x.reshape(1, -1) if n % 2 else x)
    assert got.dtype == torch.float64
    # each run of 1024 float32 terms is off by ~eps·log2(1024)·Σ|x| at most
    assert abs(float(got - exact)) <= 1e-3


def test_float64_sum_of_float64_input_is_the_plain_sum():
    x = torch.randn(5000, dtype=torch.float64)
    assert float64_sum(x) == x.sum()


def test_float64_sum_keeps_non_finite_terms():
    x = torch.ones(3000)
    x[2500] = float("nan")
    assert torch.isnan(float64_sum(x))
