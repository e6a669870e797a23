"""Data-parallel helpers: one all-reduce per curvature fit, rank-aware utilities.

The model is replicated, the data is sharded: every rank accumulates curvature on its own
shard and :func:`all_reduce_curvature` sums the shards in ONE collective, so every rank ends
up with the factors of the whole data set (and identical hyperparameter updates after it).
NCCL on GPUs, gloo on CPUs (:func:`init_distributed` picks). Run with
``torchrun --nproc_per_node=K script.py``.

Sharding must not repeat samples, or they are counted twice in N, the loss and the factors:
:func:`shard` splits in-memory tensors exactly; a ``DistributedSampler`` pads the data set
with repeated samples unless its length is divisible by the world size (or it drops the
remainder with ``drop_last=True``), which :func:`distributed_loader` warns about.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from spamkern.curvature.accumulate import Curvature

__all__ = [
    "all_gather_object",
    "all_reduce_curvature",
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_module",
    "check_same_on_all_ranks",
    "distributed_loader",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank",
    "set_epoch",
    "shard",
    "world_size",
]


# ---------------------------------------------------------------------------- ranks
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one that writes checkpoints and logs."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_*``).

    ``backend=None`` picks NCCL when CUDA is available, else gloo. Returns this rank's
    device (``cuda:LOCAL_RANK`` under NCCL). Without torchrun's variables it is a no-op that
    returns the default device, so the same script runs as a single process.
    """
    use_cuda = torch.cuda.is_available()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if use_cuda
        else torch.device("cpu")
    )
    if "WORLD_SIZE" not in os.environ or is_distributed():
        return device
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not use_cuda:
            raise ValueError("the NCCL backend needs CUDA devices; use backend='gloo' on CPUs")
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return device


# ---------------------------------------------------------------------------- collectives
def all_reduce_sum(value: float | torch.Tensor) -> float | torch.Tensor:
    """Sum a number (returned as float) or a tensor (a new tensor) over ranks."""
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        if is_distributed():
            dist.all_reduce(out)
        return out
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t)


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` without a process group.

    For per-rank state that rank 0 must save, e.g. each rank's random-generator states.
    """
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(value: int, what: str) -> None:
    """Raise on every rank if ``value`` differs between ranks (e.g. optimiser steps per
    epoch: unequal counts leave ranks waiting in different collectives)."""
    if not is_distributed():
        return
    t = torch.tensor([int(value), -int(value)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0]), -int(t[1])
    if high != low:
        raise ValueError(
            f"the {what} differ between ranks (from {low} to {high}); every rank must do the "
            "same: give each rank the same number of samples (a data set size divisible by "
            "the world size, or a DistributedSampler) or the same number of batches"
        )


def all_reduce_gradients(params: Iterable[nn.Parameter], weight: float | None = None) -> None:
    """Average the gradients of ``params`` over ranks in place, in one all-reduce.

    Without ``weight`` every rank counts equally (what DistributedDataParallel does: exact
    when all ranks' batches have the same size). With ``weight`` — the number of samples
    behind this rank's gradient of a *mean* loss — the result is Σ_r w_r g_r / Σ_r w_r, the
    gradient of the mean over the union of the batches, exact for unequal shards.
    Parameters without a gradient count as zero; every rank must pass the same list.
    """
    params = [p for p in params]
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    w = 1.0 if weight is None else float(weight)
    if w < 0:
        raise ValueError(f"weight must be >= 0 (a sample count), got {weight}")
    flat = torch.cat([g.reshape(-1) * w for g in grads] + [grads[0].new_tensor([w])])
    dist.all_reduce(flat)
    total = float(flat[-1])
    if total <= 0:
        raise ValueError("the gradient weights sum to 0 over all ranks (no samples anywhere)")
    flat = flat[:-1] / total
    pos = 0
    for p, g in zip(params, grads):
        part = flat[pos : pos + g.numel()].view_as(g)
        pos += g.numel()
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)


def broadcast_module(module: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers to every rank (one broadcast per dtype)."""
    if not is_distributed():
        return module
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.numel() > 0]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src)
            pos = 0
            for t in group:
                t.copy_(flat[pos : pos + t.numel()].view_as(t))
                pos += t.numel()
    return module


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
    for index in sorted(result.input_means):  # means, like A, go back to raw sums
        tensors.append((result.input_means[index] * local_n).reshape(-1))
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
    for index in sorted(result.input_means):
        result.input_means[index] = take(result.input_means[index]) / global_n
    result.n_data = global_n


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- data
def shard(
    X: torch.Tensor,
    y: torch.Tensor,
    rank_index: int | None = None,
    n_ranks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of in-memory ``(X, y)``: no sample repeated or dropped.

    ``rank_index``/``n_ranks`` default to this process's rank and the world size. The first
    ``N % world_size`` ranks get one sample more than the others. Pass the result
    as ``train_data`` to :func:`spamkern.fit_laplace` / :func:`spamkern.marglik_train`.
    """
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("shard takes tensors X and y; shard a Dataset with distributed_loader")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    r = rank() if rank_index is None else int(rank_index)
    w = world_size() if n_ranks is None else int(n_ranks)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"need 0 <= rank < world_size, got rank={r}, world_size={w}")
    n = X.shape[0]
    if n < w:
        raise ValueError(f"cannot shard {n} samples over {w} ranks without empty shards")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    stop = start + base + (1 if r < extra else 0)
    return X[start:stop], y[start:stop]


def distributed_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    **loader_kwargs,
) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's part of ``dataset`` (a ``DistributedSampler``).

    Call :func:`set_epoch` at the start of every epoch (``marglik_train`` does) so the
    shuffles differ between epochs and agree between ranks.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size(),
        rank=rank(),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    n, w = len(dataset), world_size()
    if n % w and not drop_last:
        warnings.warn(
            f"{n} samples over {w} ranks: DistributedSampler repeats {w - n % w} of them, "
            "which then count twice in N, the loss and the curvature; use a data set size "
            "divisible by the world size, drop_last=True, or spamkern.distributed.shard",
            stacklevel=2,
        )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)


def set_epoch(data: object, epoch: int) -> None:
    """Tell a DistributedSampler-backed loader (or anything with ``set_epoch``) the epoch."""
    for candidate in (
        data,
        getattr(data, "sampler", None),
        getattr(getattr(data, "batch_sampler", None), "sampler", None),
    ):
        if candidate is not None and hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
            return
