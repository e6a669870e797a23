"""Batched eigendecompositions of curvature factors: eigenvalues alone or with vectors,
equal to LAPACK's one by one, reused when marked, and NaN/Inf named, never passed on."""

from __future__ import annotations

import pytest
import torch

from spamkern.posterior.eigen import batched_eigh, keep_eigh


def _factors(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in (5, 7, 5):
        x = torch.randn(n + 3, n, generator=gen, dtype=torch.float64)
        out.append(x.T @ x)
    return out


@pytest.mark.parametrize("vectors", [True, False])
def test_batched_eigh_matches_eigh_one_by_one(vectors):
    mats = _factors()
    for m, (values, basis) in zip(mats, batched_eigh(mats, vectors=vectors)):
        ref_values, ref_vectors = torch.linalg.eigh(m)
        torch.testing.assert_close(values, ref_values.clamp_min(0), rtol=1e-12, atol=1e-12)
        if vectors:
            torch.testing.assert_close(basis @ torch.diag(values) @ basis.T, m)
        else:
            assert basis is None


def test_a_kept_factor_is_decomposed_once_and_upgraded_to_vectors_on_demand():
    m = keep_eigh(_factors()[0])
    (first,) = batched_eigh([m], vectors=False)
    (again,) = batched_eigh([m], vectors=False)
    assert again[0] is first[0] and again[1] is None
    (full,) = batched_eigh([m], vectors=True)
    assert full[1] is not None
    (reused,) = batched_eigh([m], vectors=False)
    assert reused[1] is full[1]
    m.mul_(2.0)  # modified in place: decomposed anew
    (fresh,) = batched_eigh([m], vectors=False)
    torch.testing.assert_close(fresh[0], 2.0 * full[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("vectors", [True, False])
def test_non_finite_factors_are_named(bad, vectors):
    mats = _factors()
    mats[2][1, 1] = bad
    with pytest.raises(ValueError, match=r"factor 'late\[A\]' contains NaN or Inf"):
        batched_eigh(mats, ["a", "b", "late[A]"], vectors=vectors)
