"""Data-parallel helpers: one all-reduce per curvature fit, rank-aware utilities."""

from __future__ import annotations

import torch
import torch.distributed as dist

from spamkern.curvature.accumulate import Curvature


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(value: float) -> float:
    """Sum a Python number over ranks (float64 on the CPU for gloo, on the GPU for NCCL)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks with one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    pos = 0
    for g in grads:
        g.copy_(flat[pos : pos + g.numel()].reshape(g.shape))
        pos += g.numel()


def all_reduce_curvature(result: Curvature) -> None:
    """Sum loss, N and every factor/diagonal over ranks in place, in ONE all-reduce.

    A factors were divided by the local N; they are rescaled to the global N.
    """
    if not is_distributed():
        raise RuntimeError("all_reduce_curvature needs an initialised torch.distributed group")
    local_n = result.n_data
    tensors: list[torch.Tensor] = [result.loss.reshape(1)]
    for index in sorted(result.factors):
        facs = result.factors[index]
        tensors.append(facs[0].reshape(-1))
        if len(facs) == 2:
            tensors.append((facs[1] * local_n).reshape(-1))  # back to the raw sum
    for index in sorted(result.diags):
        tensors.append(result.diags[index].reshape(-1))
    dtype = result.loss.dtype
    flat = torch.cat([t.to(dtype) for t in tensors] + [result.loss.new_tensor([float(local_n)])])
    dist.all_reduce(flat)
    global_n = int(round(float(flat[-1])))
    pos = 0

    def take(like: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        part = flat[pos : pos + like.numel()].reshape(like.shape)
        pos += like.numel()
        return part.to(like.dtype)

    result.loss = take(result.loss)
    for index in sorted(result.factors):
        facs = result.factors[index]
        facs[0] = take(facs[0])
        if len(facs) == 2:
            facs[1] = take(facs[1]) / global_n
    for index in sorted(result.diags):
        result.diags[index] = take(result.diags[index])
    result.n_data = global_n
