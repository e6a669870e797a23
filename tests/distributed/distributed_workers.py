"""What each spawned rank runs in the data-parallel tests (importable by the children).

Every worker joins a gloo group on 127.0.0.1, runs on one thread, and writes what it
computed to ``out_dir/rank<r>.pt`` for the parent test to compare with a 1-process run.
"""

from __future__ import annotations

import os
import signal
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

DT = torch.float64


# ---------------------------------------------------------------------------- plumbing
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, retries: int = 0, done=None) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo ranks; raises if any rank fails.

    A rank can abort (SIGABRT, "terminate called without an active exception" from gloo's
    C++ threads) on a busy machine — about one run in twenty of this suite on 2 cores —
    without any error of its own. ``done()`` says whether every rank wrote its results
    (the abort then came at shut-down: nothing is lost); otherwise up to ``retries`` more
    tries start again on a new port. Any other failure, or an abort on the last try,
    raises."""
    for attempt in range(retries + 1):
        try:
            mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size)
            return
        except mp.ProcessExitedException as err:
            if err.signal_name != "SIGABRT":
                raise
            if done is not None and done():
                warnings.warn("a gloo rank aborted after writing its results", stacklevel=2)
                return
            if attempt == retries:
                raise
            warnings.warn(f"a gloo rank aborted on try {attempt + 1}; starting again", stacklevel=2)


# ---------------------------------------------------------------------------- problems
def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)
    ).to(DT)


def problem(n: int, kind: str = "mlp", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if kind == "mlp" else (n, 2, 5, 5)
    return torch.randn(*shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def fit_summary(post) -> dict:
    """Everything a fit is compared on."""
    factors = post.kron_factors if post.structure == "kron" else []
    return {
        "factors": [
            [f.clone() for f in fac] if isinstance(fac, tuple) else fac.clone() for fac in factors
        ],
        "curvature_diag": post.curvature_diag().clone(),
        "loss": post.curvature.loss.clone(),
        "n_data": post.n_data,
        "log_marglik": post.log_marginal_likelihood().detach().clone(),
        "precision_diag": post.precision_diag().clone(),
    }


FIT_CASES = {  # name -> (model kind, structure, curvature, prior)
    "mlp-kron-ggn": ("mlp", "kron", "ggn", "layerwise"),
    "cnn-kron-ggn": ("cnn", "kron", "ggn", "unitwise"),
    "mlp-diag-ef": ("mlp", "diag", "ef", "parameterwise"),
}
N_FIT = 37  # odd: the two shards differ in size
N_LOADER = 36  # divisible by 2: DistributedSampler repeats nothing


def fit_all(data_for) -> dict:
    """Fits of every case; ``data_for(X, y)`` gives the training data of one rank."""
    import spamkern as sk

    out = {}
    for name, (kind, structure, curvature, prior) in FIT_CASES.items():
        Xk, yk = problem(N_FIT, kind, seed=1)
        model = mlp(2) if kind == "mlp" else cnn(2)
        post = sk.fit_laplace(
            model,
            data_for(Xk, yk),
            structure=structure,
            curvature=curvature,
            prior=prior,
            prior_precision=0.5,
            batch_size=7,
            progress=False,
        )
        out[name] = fit_summary(post)
    return out


# ---------------------------------------------------------------------------- workers
def fit_worker(rank: int, out_dir: str) -> None:
    """Per-rank fits on exact shards and on a DistributedSampler loader, plus collectives."""
    import spamkern as sk
    from spamkern.distributed import (
        all_gather_object,
        all_reduce_gradients,
        all_reduce_sum,
        broadcast_module,
        check_same_on_all_ranks,
        distributed_loader,
        shard,
    )

    out = fit_all(shard)
    X, y = problem(N_LOADER, seed=3)
    loader = distributed_loader(TensorDataset(X, y), batch_size=5, shuffle=True, seed=4)
    loader.sampler.set_epoch(1)
    post = sk.fit_laplace(mlp(2), loader, structure="kron", prior="layerwise", progress=False)
    out["loader"] = fit_summary(post)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed_loader(TensorDataset(*problem(N_FIT)), batch_size=5)
    out["padding_warning"] = [str(w.message) for w in caught]
    out["sum"] = all_reduce_sum(float(rank + 1))
    out["gathered"] = all_gather_object({"rank": rank})
    check_same_on_all_ranks(5, "batches")
    try:
        check_same_on_all_ranks(3 + rank, "optimiser steps per epoch")
        out["mismatch"] = None
    except ValueError as err:
        out["mismatch"] = str(err)
    # a differently initialised model on rank 1, made identical by the broadcast
    model = broadcast_module(mlp(5 + rank))
    out["broadcast"] = [p.detach().clone() for p in model.parameters()]
    # weighted gradient average over unequal shards = gradient of the global mean loss
    Xs, ys = shard(*problem(N_FIT, seed=6))
    loss = nn.functional.cross_entropy(model(Xs), ys)
    loss.backward()
    all_reduce_gradients(model.parameters(), weight=ys.shape[0])
    out["grads"] = [p.grad.clone() for p in model.parameters()]
    torch.save(out, Path(out_dir) / f"fit{rank}.pt")


N_TRAIN = 41  # odd: full-batch shards of 21 and 20 (gradients averaged by sample count)
# resume runs: shuffled minibatches on shards of 21 and 20 (3 batches each), so each rank's
# own restored shuffling state decides which samples meet
RESUME_N, RESUME_BATCH = 41, 7


def marglik_kwargs(batch_size: int, n_epochs: int = 4) -> dict:
    return dict(
        n_epochs=n_epochs,
        structure="kron",
        curvature="ggn",
        prior="layerwise",
        prior_precision=1.0,
        n_hypersteps=5,
        lr=1e-2,
        lr_hyp=0.1,
        optimizer="adam",
        scheduler="cosine",
        batch_size=batch_size,
        progress=False,
        seed=0,
    )


def marglik_summary(result) -> dict:
    return {
        "params": [p.detach().clone() for p in result.model.parameters()],
        "log_precision": result.prior.log_precision.detach().clone(),
        "marglik": list(result.marglik),
        "epochs": [h["epoch"] for h in result.history],
        "factors": fit_summary(result.posterior)["factors"],
    }


class EpochHook:
    """Stands in for the online-pruning hook: records the epochs whose marglik step ran in
    this process and SIGKILLs it at ``kill_at`` (after the previous epoch's checkpoint was
    written); never changes the masks."""

    masks = None

    def __init__(self, kill_at: int | None):
        self.kill_at = kill_at
        self.seen: list[int] = []

    def step(self, epoch, n_epochs, model, posterior):
        self.seen.append(epoch)
        if epoch == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return None


def marglik_worker(
    rank: int,
    out_dir: str,
    tag: str,
    ckpt: str | None = None,
    resume: bool = False,
    kill_at: int | None = None,
) -> None:
    """marglik_train on this rank's shard; optionally SIGKILLed at ``kill_at``.

    ``tag`` "full": N_TRAIN samples, one full-shard batch per step (comparable with one
    process on all data); "resume": RESUME_N samples in shuffled minibatches.
    """
    import spamkern as sk
    from spamkern.distributed import shard

    n, batch = (N_TRAIN, None) if tag == "full" else (RESUME_N, RESUME_BATCH)
    X, y = shard(*problem(n, seed=7))
    hook = EpochHook(kill_at)
    result = sk.marglik_train(
        mlp(8),
        (X, y),
        **marglik_kwargs(batch_size=batch or X.shape[0]),
        checkpoint_path=ckpt,
        resume=resume,
        online_pruning=hook,
    )
    summary = marglik_summary(result)
    summary["epochs_run_here"] = hook.seen
    torch.save(summary, Path(out_dir) / f"{tag}{rank}.pt")


def unequal_steps_error(n: int, batch_size: int) -> str | None:
    """marglik_train on shards whose batch counts differ: the error every rank raises."""
    import spamkern as sk
    from spamkern.distributed import shard

    try:
        sk.marglik_train(mlp(8), shard(*problem(n)), **marglik_kwargs(batch_size, n_epochs=1))
    except ValueError as err:
        return str(err)
    return None


def fit_and_train_worker(rank: int, out_dir: str) -> None:
    """One spawn for all: the fits, then uninterrupted marglik_train runs of both kinds."""
    fit_worker(rank, out_dir)
    marglik_worker(rank, out_dir, "full")
    marglik_worker(rank, out_dir, "resume")
    message = unequal_steps_error(N_TRAIN, 4)  # 21 and 20 samples: 6 and 5 batches
    torch.save(message, Path(out_dir) / f"unequal{rank}.pt")


def abort_once_worker(rank: int, out_dir: str) -> None:
    """Rank 0 aborts on its first run (a marker file remembers it); then both ranks write."""
    marker = Path(out_dir) / "aborted"
    if rank == 0 and not marker.exists():
        marker.touch()
        os.abort()
    torch.save(rank, Path(out_dir) / f"ok{rank}.pt")
