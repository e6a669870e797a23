"""The Gram sums accumulated by column panels on the upper triangle, then mirrored, equal
the full product xᵀx (float64 reference), with and without an accumulator."""

import pytest
import torch

from spamkern.ops.factors import gram_upper, mirror_upper_


@pytest.mark.parametrize("d", [10, 65, 200, 784])
def test_upper_panels_then_mirror_equal_the_full_gram(d):
    g = torch.Generator().manual_seed(d)
    x1 = torch.randn(37, d, generator=g, dtype=torch.float64)
    x2 = torch.randn(5, d, generator=g, dtype=torch.float64)
    out = gram_upper(x1, None, 0.5)
    out = gram_upper(x2, out, 2.0)
    mirror_upper_(out)
    reference = 0.5 * x1.T @ x1 + 2.0 * x2.T @ x2
    torch.testing.assert_close(out, reference, rtol=1e-13, atol=1e-12)
    assert torch.equal(out, out.T)


def test_mirror_of_a_stack_copies_each_upper_triangle():
    m = torch.arange(2 * 3 * 3, dtype=torch.float64).reshape(2, 3, 3)
    expected = torch.stack([torch.triu(a) + torch.triu(a, 1).T for a in m])
    assert torch.equal(mirror_upper_(m.clone()), expected)


def test_gram_upper_refuses_a_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        gram_upper(torch.zeros(3))
