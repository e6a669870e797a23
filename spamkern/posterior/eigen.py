"""Symmetric eigendecompositions of Kronecker factors, batched, with a recovery path.

Factors of the same size are stacked and decomposed in one ``torch.linalg.eigh`` call (or
``eigvalsh`` when only the eigenvalues are asked for: the scalar/layerwise evidence needs no
eigenvectors, and skipping them halves the cost of the decomposition). If
LAPACK/cuSOLVER fails to converge (rank-deficient or badly scaled factors), the batch is
retried in float64, then with a growing diagonal jitter; only then is it an error — with the
factor's name and what to do, never a silent NaN.

Equal factors in one call (a bias block shares its weight's G) are decomposed once. A
factor marked with :func:`keep_eigh` (one that stays the same across fits, such as the
data-only input factor of a first layer) is decomposed once; later calls reuse the result
as long as the tensor is not modified in place.
"""

from __future__ import annotations

import torch

_JITTERS = (1e-10, 1e-8, 1e-6)


def _decompose(stack: torch.Tensor, vectors: bool):
    if vectors:
        return torch.linalg.eigh(stack)
    return torch.linalg.eigvalsh(stack), None


def _refuse_non_finite(stack: torch.Tensor, names: list[str]) -> None:
    for name, m in zip(names, stack):
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"the curvature factor {name!r} contains NaN or Inf")


def _eigh_with_recovery(
    stack: torch.Tensor, names: list[str], vectors: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The factors are scanned for NaN/Inf only when the decomposition fails or returns
    non-finite eigenvalues (a clean pass costs no extra sweep over the matrices)."""
    try:
        values, basis = _decompose(stack, vectors)
        if bool(torch.isfinite(values).all()):
            return values, basis
    except torch.linalg.LinAlgError:
        pass
    _refuse_non_finite(stack, names)
    work = stack.to(torch.float64)
    scale = work.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
    for jitter in (0.0, *_JITTERS):
        try:
            values, basis = _decompose(work + jitter * scale * eye, vectors)
        except torch.linalg.LinAlgError:
            continue
        return values.to(stack.dtype), None if basis is None else basis.to(stack.dtype)
    raise ValueError(
        f"the eigendecomposition of the curvature factors {names} failed even in float64 with "
        f"relative jitter up to {_JITTERS[-1]}; the curvature is degenerate — check the data "
        "and model outputs for NaN/Inf or extreme values"
    )


_MEMO = "_spamkern_eigh"


def keep_eigh(factor: torch.Tensor) -> torch.Tensor:
    """Mark ``factor`` so that its eigendecomposition is computed once and then reused."""
    setattr(factor, _MEMO, None)
    return factor


Eigen = tuple[torch.Tensor, torch.Tensor | None]


def is_kept(factor: torch.Tensor) -> bool:
    """Whether ``factor`` was marked by :func:`keep_eigh` (it outlives one fit)."""
    return hasattr(factor, _MEMO)


def _remembered(m: torch.Tensor, vectors: bool) -> Eigen | None:
    memo = getattr(m, _MEMO, None)
    if memo is None or memo[0] != m._version or (vectors and memo[1][1] is None):
        return None
    return memo[1]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, the diagonals compared first: different factors of one size almost
    always differ there, which spares a sweep over every pair of whole matrices."""
    if a is b:
        return True
    return torch.equal(a.diagonal(), b.diagonal()) and torch.equal(a, b)


def batched_eigh(
    mats: list[torch.Tensor], names: list[str] | None = None, vectors: bool = True
) -> list[Eigen]:
    """(eigenvalues clamped at 0, eigenvectors) of every symmetric matrix in ``mats``;
    eigenvectors None when ``vectors`` is False (eigenvalues only, about half the cost)."""
    names = names or [str(i) for i in range(len(mats))]
    out: list[Eigen | None] = [None] * len(mats)
    by_size: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    twins: dict[int, int] = {}  # equal factors (a bias shares its weight's G) decompose once
    for i, m in enumerate(mats):
        out[i] = _remembered(m, vectors)
        if out[i] is not None:
            continue
        group = by_size.setdefault((m.shape[-1], m.dtype, m.device), [])
        twin = next((j for j in group if _equal(mats[j], m)), None)
        if twin is None:
            group.append(i)
        else:
            twins[i] = twin
    for indices in by_size.values():
        values, basis = _eigh_with_recovery(
            torch.stack([mats[i] for i in indices]), [names[i] for i in indices], vectors
        )
        for j, i in enumerate(indices):
            out[i] = (values[j].clamp_min(0.0), None if basis is None else basis[j])
            if hasattr(mats[i], _MEMO):
                setattr(mats[i], _MEMO, (mats[i]._version, out[i]))
    for i, twin in twins.items():
        out[i] = out[twin]
    return out  # type: ignore[return-value]
