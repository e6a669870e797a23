"""2-process gloo runs (spawned here, CPU, float64) against 1-process runs on the same data.

Curvature fits must give the same factors, loss, N, log marginal likelihood and precision
on every rank as one process on all the data; marglik_train the same trained parameters,
hyperparameters and marginal likelihoods; and a run SIGKILLed mid-epoch and resumed from
its checkpoint the same as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_workers import (
    FIT_CASES,
    N_FIT,
    N_LOADER,
    N_TRAIN,
    abort_once_worker,
    fit_all,
    fit_and_train_worker,
    fit_summary,
    marglik_kwargs,
    marglik_summary,
    marglik_worker,
    mlp,
    problem,
    spawn,
)
from torch import nn

import spamkern as sk
from spamkern.distributed import init_distributed, is_distributed, set_epoch, shard
from spamkern.marglik.checkpoint import read_checkpoint

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]
RTOL = 1e-6


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_fit_equal(got: dict, ref: dict, what: str) -> None:
    assert got["n_data"] == ref["n_data"], what
    for key in ("loss", "log_marglik", "precision_diag", "curvature_diag"):
        assert rel(got[key], ref[key]) < RTOL, f"{what}: {key}"
    assert len(got["factors"]) == len(ref["factors"])
    for fa, fb in zip(got["factors"], ref["factors"]):
        for x, z in zip(fa, fb):
            assert rel(x, z) < RTOL, what


def _written(out: Path, prefix: str, world_size: int = 2) -> bool:
    """Whether every rank saved its ``prefix`` results (the last thing a worker does)."""
    return all((out / f"{prefix}{r}.pt").exists() for r in range(world_size))


def load_ranks(out: Path, prefix: str, world_size: int = 2) -> list[dict]:
    return [torch.load(out / f"{prefix}{r}.pt", weights_only=False) for r in range(world_size)]


def test_single_process_helpers(monkeypatch):
    """Without torchrun's variables init_distributed is a no-op; set_epoch finds samplers."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    device = init_distributed()
    assert not is_distributed()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
    first = [int(i) for i in sampler]
    set_epoch(loader, 5)
    assert sampler.epoch == 5 and [int(i) for i in sampler] != first
    with pytest.raises(ValueError, match="'nccl' or 'gloo'"):
        monkeypatch.setenv("WORLD_SIZE", "1")
        init_distributed("mpi")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One 2-rank spawn: curvature fits, collectives, then an uninterrupted marglik run."""
    out = tmp_path_factory.mktemp("two_ranks")
    spawn(fit_and_train_worker, 2, str(out), retries=2, done=lambda: _written(out, "unequal"))
    return out


def test_shard_is_exact():
    X, y = torch.arange(11.0)[:, None], torch.arange(11)
    parts = [shard(X, y, r, 3) for r in range(3)]
    assert [p[0].shape[0] for p in parts] == [4, 4, 3]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="rank"):
        shard(X, y, 3, 3)
    with pytest.raises(ValueError, match="empty shards"):
        shard(X[:2], y[:2], 0, 3)


def test_fit_two_ranks_equals_one(two_ranks):
    ranks = load_ranks(two_ranks, "fit")
    ref = fit_all(lambda X, y: (X, y))
    for r, got in enumerate(ranks):
        for name in FIT_CASES:
            assert got[name]["n_data"] == N_FIT
            assert_fit_equal(got[name], ref[name], f"rank {r}, {name}")
        # the DistributedSampler loader covers the data set exactly once
        X, y = problem(N_LOADER, seed=3)
        one = sk.fit_laplace(
            mlp(2), (X, y), structure="kron", prior="layerwise", batch_size=5, progress=False
        )
        assert_fit_equal(got["loader"], fit_summary(one), f"rank {r}, loader")
        assert got["sum"] == 3.0
        assert any("repeats 1 of them" in m for m in got["padding_warning"])
        assert got["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert "optimiser steps per epoch differ between ranks (from 3 to 4)" in got["mismatch"]
        for p, q in zip(got["broadcast"], mlp(5).parameters()):
            assert torch.equal(p, q.detach())
    # weighted gradient average over shards of 19 and 18 = gradient of the global mean
    model = mlp(5)
    Xg, yg = problem(N_FIT, seed=6)
    nn.functional.cross_entropy(model(Xg), yg).backward()
    for r in range(2):
        for g, p in zip(ranks[r]["grads"], model.parameters()):
            assert rel(g, p.grad) < 1e-12


@pytest.fixture(scope="module")
def one_process_marglik():
    X, y = problem(N_TRAIN, seed=7)
    result = sk.marglik_train(mlp(8), (X, y), **marglik_kwargs(batch_size=N_TRAIN))
    return marglik_summary(result)


def assert_marglik_equal(got: dict, ref: dict, what: str) -> None:
    assert got["epochs"] == ref["epochs"] == [1, 2, 3, 4], what
    assert rel(got["marglik"], ref["marglik"]) < RTOL, what
    assert rel(got["log_precision"], ref["log_precision"]) < RTOL, what
    for p, q in zip(got["params"], ref["params"]):
        assert rel(p, q) < RTOL, what
    for fa, fb in zip(got["factors"], ref["factors"]):
        for x, z in zip(fa, fb):
            assert rel(x, z) < RTOL, what


def test_marglik_train_two_ranks_equals_one(two_ranks, one_process_marglik):
    ref = one_process_marglik
    # the hyperparameters actually moved, so equal values are not trivially equal
    assert rel(ref["log_precision"], torch.zeros_like(ref["log_precision"])) > 1e-3
    for r, got in enumerate(load_ranks(two_ranks, "full")):
        assert got["epochs_run_here"] == [1, 2, 3, 4]
        assert_marglik_equal(got, ref, f"2 ranks, rank {r}")


def test_unequal_step_counts_are_refused_on_every_rank(two_ranks):
    for message in load_ranks(two_ranks, "unequal"):
        assert "optimiser steps per epoch differ between ranks (from 5 to 6)" in message


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, two_ranks):
    """SIGKILL both ranks during epoch 3 (after epoch 2's checkpoint), resume to epoch 4.

    Shuffled minibatches: a wrongly restored shuffling or MC state changes the trajectory.
    """
    ckpt = str(tmp_path / "run.pt")
    with pytest.raises(Exception, match="signal|SIGKILL|exited"):
        spawn(marglik_worker, 2, str(tmp_path), "resume", ckpt, False, 3)
    assert not (tmp_path / "resume0.pt").exists()
    assert read_checkpoint(ckpt)["epoch"] == 2
    spawn(
        marglik_worker, 2, str(tmp_path), "resume", ckpt, True, None,
        retries=1, done=lambda: _written(tmp_path, "resume"),
    )  # fmt: skip
    uninterrupted = load_ranks(two_ranks, "resume")
    for r, got in enumerate(load_ranks(tmp_path, "resume")):
        assert got["epochs_run_here"] == [3, 4]  # it really continued from the checkpoint
        assert_marglik_equal(got, uninterrupted[r], f"resumed, rank {r}")
    # the two ranks' runs are one run: identical parameters and hyperparameters
    assert_marglik_equal(uninterrupted[1], uninterrupted[0], "rank 1 vs rank 0")


def test_spawn_starts_again_after_an_abort_only_when_allowed(tmp_path):
    """The harness's answer to a gloo abort: a new try when ``retries`` allows, else the
    abort is raised (so a rank that always aborts fails its test)."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn(abort_once_worker, 2, str(first))
    spawn(abort_once_worker, 2, str(second), retries=1)
    assert _written(second, "ok")
