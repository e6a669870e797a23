"""Random block-sparse weights with the awkward cases the kernels must survive."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spamkern.sparse import BlockSparseWeight


def random_block_mask(
    n: int, k: int, block: tuple[int, int], density: float, gen: torch.Generator
) -> torch.Tensor:
    """Block mask with the given density, its first block-row always empty when it has
    more than one (kernels must write bias/zeros there)."""
    nb, kb = -(-n // block[0]), -(-k // block[1])
    mask = torch.rand(nb, kb, generator=gen) < density
    if nb > 1 and density < 1.0:
        mask[0] = False
    return mask


def make_case(n, k, m, block, density, dtype, seed, bias=True, device="cpu"):
    """(x, weight, bias, reference) with the reference computed in float64."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mask = random_block_mask(n, k, block, density, gen)
    sparse = BlockSparseWeight.from_dense(w.to(dtype), block, mask).to(device)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    ref = F.linear(x.double(), sparse.to_dense().double(), None if b is None else b.double())
    return x, sparse, b, ref


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# Tolerances against a float64 reference: narrower operands, looser bound.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
