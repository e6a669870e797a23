"""Batched eigendecompositions of curvature factors: eigenvalues alone or with vectors,
equal to LAPACK's one by one, reused when marked, and NaN/Inf named, never passed on."""

from __future__ import annotations

import pytest
import torch

from spamkern.posterior import eigen
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


def _large_factors(dtype: torch.dtype, n: int = 200, seed: int = 1) -> list[torch.Tensor]:
    """Factors past the size where CPU eigenvalues go through SciPy's LAPACK."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(n + 50, n, generator=gen, dtype=torch.float64)
        out.append((x.T @ x / n).to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_cpu_eigenvalues_agree_with_float64_eigvalsh(dtype):
    mats = _large_factors(dtype)
    assert mats[0].shape[-1] >= eigen._LAPACK_MIN_SIZE
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for m, (values, basis) in zip(mats, batched_eigh(mats, vectors=False)):
        assert basis is None and values.dtype == dtype
        ref = torch.linalg.eigvalsh(m.double()).clamp_min(0)
        scale = float(ref.max())
        torch.testing.assert_close(values.double(), ref, rtol=0, atol=tol * scale)


def test_large_cpu_eigenvalues_run_under_torchs_thread_count(monkeypatch):
    """LAPACK's own BLAS pool is held to torch.get_num_threads() during the call and
    restored after it."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()
                if pool["user_api"] == "blas"}  # fmt: skip

    real, seen = eigen._syevd_for, []

    def spying(n, dtype):
        syevd = real(n, dtype)

        def call(a):
            seen.append(set(blas_threads().values()))
            return syevd(a)

        return call

    monkeypatch.setattr(eigen, "_syevd_for", spying)
    before = blas_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched_eigh(_large_factors(torch.float32), vectors=False)
    finally:
        torch.set_num_threads(threads)
    assert seen and all(counts == {1} for counts in seen)
    assert blas_threads() == before


def test_lapack_non_convergence_is_recovered_in_float64(monkeypatch):
    real = eigen._syevd_for

    def failing_in_float32(n, dtype):
        syevd = real(n, dtype)
        if dtype == torch.float32:
            return lambda a: (syevd(a)[0], None, 3)  # info > 0: did not converge
        return syevd

    monkeypatch.setattr(eigen, "_syevd_for", failing_in_float32)
    mats = _large_factors(torch.float32)
    for m, (values, _) in zip(mats, batched_eigh(mats, vectors=False)):
        assert values.dtype == torch.float32
        torch.testing.assert_close(
            values.double(), torch.linalg.eigvalsh(m.double()).clamp_min(0), rtol=0, atol=1e-5
        )


def test_a_non_finite_large_factor_is_named():
    mats = _large_factors(torch.float32)
    mats[1][3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"factor 'wide\[G\]' contains NaN or Inf"):
        batched_eigh(mats, ["wide[A]", "wide[G]"], vectors=False)


def test_large_cpu_eigenvalues_read_the_lower_triangle_as_torch_does():
    """A factor that is not exactly symmetric gives the eigenvalues torch's eigvalsh gives
    (its default UPLO='L'), not those of the other triangle."""
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(200, 200, generator=gen, dtype=torch.float64)
    ((values, _),) = batched_eigh([m], vectors=False)
    lower = torch.linalg.eigvalsh(m).clamp_min(0)
    torch.testing.assert_close(values, lower, rtol=0, atol=1e-10)
    assert (values - torch.linalg.eigvalsh(m, UPLO="U").clamp_min(0)).abs().max() > 1e-3
