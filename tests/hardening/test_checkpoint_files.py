"""Checkpoints: atomic writes with a checksum; damaged files refused by name; strict resume."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import spamkern as sk
from spamkern.marglik.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    should_resume,
)

CPU = torch.device("cpu")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (24,), generator=g
    )


KWARGS = dict(n_epochs=2, n_hypersteps=2, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> bytes:
    """The bytes of a real checkpoint written by marglik_train after 2 epochs."""
    path = tmp_path_factory.mktemp("ckpt") / "run.pt"
    sk.marglik_train(_mlp(), _data(), **KWARGS, checkpoint_path=path)
    return path.read_bytes()


def test_round_trip_keeps_the_payload(tmp_path):
    payload = {"epoch": 3, "w": torch.arange(5.0), "history": [{"loss": 0.5, "marglik": None}]}
    save_checkpoint(tmp_path / "c.pt", payload)
    loaded = load_checkpoint(tmp_path / "c.pt", CPU)
    assert loaded["epoch"] == 3 and loaded["history"] == payload["history"]
    assert torch.equal(loaded["w"], payload["w"])
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"epoch": 2, "bad": Unpicklable()})
    assert load_checkpoint(path, CPU)["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def _flip(data: bytes, where: float) -> bytes:
    i = int(len(data) * where)
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: _flip(b, 0.5), "is damaged: the sha256"),
        (lambda b: _flip(b, 0.999), "is damaged: the sha256"),
        (lambda b: b[: len(b) // 2], "is truncated"),
        (lambda b: b + b"\x00" * 7, "7 unexpected bytes"),
        (lambda b: b"", "is empty"),
        (lambda b: os.urandom(2000), "is not a spamkern checkpoint"),
        (lambda b: b[:10], "is not a spamkern checkpoint"),
        (lambda b: b.replace(b"v1 sha256=", b"v1 sha255=", 1), "damaged header"),
        (lambda b: b.replace(b"v1 sha256=", b"v7 sha256=", 1), "format version 7"),
    ],
)
def test_damaged_checkpoints_are_refused_by_name(tmp_path, checkpoint, damage, message):
    path = tmp_path / "run.pt"
    path.write_bytes(damage(checkpoint))
    with pytest.raises(CheckpointError, match=message) as info:
        sk.marglik_train(_mlp(), _data(), **KWARGS, checkpoint_path=path, resume=True)
    assert str(path) in str(info.value)


def test_a_plain_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="plain torch.save file"):
        load_checkpoint(path, CPU)


def test_the_undamaged_checkpoint_still_resumes(tmp_path, checkpoint):
    path = tmp_path / "run.pt"
    path.write_bytes(checkpoint)
    res = sk.marglik_train(
        _mlp(), _data(), **{**KWARGS, "n_epochs": 3}, checkpoint_path=path, resume=True
    )
    assert [h["epoch"] for h in res.history] == [1, 2, 3]


def test_resume_true_needs_an_existing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume='if-exists'"):
        sk.marglik_train(
            _mlp(), _data(), **KWARGS, checkpoint_path=tmp_path / "missing.pt", resume=True
        )


def test_resume_if_exists_starts_afresh_then_continues(tmp_path):
    path = tmp_path / "run.pt"
    first = sk.marglik_train(_mlp(), _data(), **KWARGS, checkpoint_path=path, resume="if-exists")
    assert [h["epoch"] for h in first.history] == [1, 2]
    again = sk.marglik_train(
        _mlp(), _data(), **{**KWARGS, "n_epochs": 3}, checkpoint_path=path, resume="if-exists"
    )
    assert again.history[:2] == first.history and again.history[2]["epoch"] == 3


def test_a_folder_as_checkpoint_path_is_refused_before_training(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="is a folder"):
        sk.marglik_train(
            _mlp(), _data(), **KWARGS, checkpoint_path=tmp_path, on_epoch_end=calls.append
        )
    assert calls == []


@pytest.mark.parametrize("resume", ["yes", 1, None])
def test_resume_takes_only_the_documented_values(tmp_path, resume):
    with pytest.raises(ValueError, match="resume must be one of"):
        should_resume(resume, tmp_path / "run.pt")


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"epoch": 1, "rng": [{}, {}]})  # two ranks' states
    assert read_checkpoint(tmp_path / "c.pt")["epoch"] == 1  # fine to inspect
    with pytest.raises(CheckpointError, match="written by 2 process"):
        load_checkpoint(tmp_path / "c.pt", CPU)  # not to resume in one process


def test_numpy_values_in_the_history_survive_a_resume(tmp_path):
    import numpy as np

    def add_metric(record):
        record["accuracy"] = np.float64(0.25)
        record["confusion"] = np.eye(2)

    path = tmp_path / "run.pt"
    sk.marglik_train(_mlp(), _data(), **KWARGS, checkpoint_path=path, on_epoch_end=add_metric)
    res = sk.marglik_train(
        _mlp(), _data(), **{**KWARGS, "n_epochs": 3}, checkpoint_path=path, resume=True
    )
    assert res.history[0]["accuracy"] == 0.25
    torch.testing.assert_close(res.history[0]["confusion"], torch.eye(2, dtype=torch.float64))


class Custom:
    """A user object torch.load(weights_only=True) would refuse."""


def test_objects_that_could_not_be_loaded_back_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint objects of types.*Custom"):
        save_checkpoint(tmp_path / "c.pt", {"epoch": 1, "history": [{"x": Custom()}]})
    assert not (tmp_path / "c.pt").exists()


def test_state_dict_metadata_is_kept(tmp_path):
    model = nn.Sequential(nn.BatchNorm1d(3))
    save_checkpoint(tmp_path / "c.pt", {"epoch": 1, "model": model.state_dict()})
    loaded = load_checkpoint(tmp_path / "c.pt", CPU)["model"]
    assert loaded._metadata == model.state_dict()._metadata


def test_resuming_with_fewer_epochs_than_the_checkpoint_holds_is_refused(tmp_path, checkpoint):
    path = tmp_path / "run.pt"
    path.write_bytes(checkpoint)  # written after epoch 2
    with pytest.raises(ValueError, match="is at epoch 2, beyond n_epochs=1"):
        sk.marglik_train(
            _mlp(), _data(), **{**KWARGS, "n_epochs": 1}, checkpoint_path=path, resume=True
        )
    done = sk.marglik_train(_mlp(), _data(), **KWARGS, checkpoint_path=path, resume=True)
    assert [h["epoch"] for h in done.history] == [1, 2]  # a finished run resumes as finished
