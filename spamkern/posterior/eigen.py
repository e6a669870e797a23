"""Symmetric eigendecompositions of Kronecker factors, batched, with a recovery path.

Factors of the same size are stacked and decomposed in one ``torch.linalg.eigh`` call. If
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


def _eigh_with_recovery(stack: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return torch.linalg.eigh(stack)
    except torch.linalg.LinAlgError:
        pass
    work = stack.to(torch.float64)
    scale = work.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
    for jitter in (0.0, *_JITTERS):
        try:
            values, vectors = torch.linalg.eigh(work + jitter * scale * eye)
        except torch.linalg.LinAlgError:
            continue
        return values.to(stack.dtype), vectors.to(stack.dtype)
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


def _remembered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    memo = getattr(m, _MEMO, None)
    if memo is None or memo[0] != m._version:
        return None
    return memo[1]


def batched_eigh(
    mats: list[torch.Tensor], names: list[str] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(eigenvalues clamped at 0, eigenvectors) of every symmetric matrix in ``mats``."""
    names = names or [str(i) for i in range(len(mats))]
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mats)
    by_size: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    twins: dict[int, int] = {}  # equal factors (a bias shares its weight's G) decompose once
    for i, m in enumerate(mats):
        out[i] = _remembered(m)
        if out[i] is not None:
            continue
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"the curvature factor {names[i]!r} contains NaN or Inf")
        group = by_size.setdefault((m.shape[-1], m.dtype, m.device), [])
        twin = next((j for j in group if torch.equal(mats[j], m)), None)
        if twin is None:
            group.append(i)
        else:
            twins[i] = twin
    for indices in by_size.values():
        values, vectors = _eigh_with_recovery(
            torch.stack([mats[i] for i in indices]), [names[i] for i in indices]
        )
        for j, i in enumerate(indices):
            out[i] = (values[j].clamp_min(0.0), vectors[j])
            if hasattr(mats[i], _MEMO):
                setattr(mats[i], _MEMO, (mats[i]._version, out[i]))
    for i, twin in twins.items():
        out[i] = out[twin]
    return out  # type: ignore[return-value]
