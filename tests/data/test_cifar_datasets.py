"""CIFAR-10 from tiny python batches written here: round trips, channel statistics, errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from dataset_files import cifar_pickle, random_cifar_batches, write_cifar_dataset

from spamkern.data import load_dataset

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture
def rng():
    return np.random.default_rng()


def _images(batches) -> np.ndarray:
    return np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)


def _labels(batches) -> torch.Tensor:
    return torch.tensor([label for _, labels in batches for label in labels], dtype=torch.int64)


@pytest.mark.parametrize(
    "pickle_kw",
    [{"protocol": 4}, {"protocol": 2}, {"protocol": 2, "legacy_numpy": True}],
    ids=["py3", "protocol2", "numpy1"],
)
def test_exact_round_trip(tmp_path, rng, pickle_kw):
    batches = random_cifar_batches(rng)
    write_cifar_dataset(tmp_path / "cifar-10-batches-py", batches, **pickle_kw)
    data = load_dataset("cifar10", root=tmp_path, normalize=False)
    assert (data.name, data.n_classes, data.input_shape) == ("cifar10", 10, (3, 32, 32))
    (x_tr, y_tr), (x_te, y_te) = data.train, data.test
    assert x_tr.shape == (12, 3, 32, 32) and x_te.shape == (3, 3, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    # training batches 1..5 in order; each row is the R, G, B planes of one image
    expected = torch.from_numpy(_images(batches[:5]).astype(np.float32)) / 255
    torch.testing.assert_close(x_tr, expected, rtol=0, atol=0)
    torch.testing.assert_close(y_tr, _labels(batches[:5]), rtol=0, atol=0)
    expected = torch.from_numpy(_images(batches[5:]).astype(np.float32)) / 255
    torch.testing.assert_close(x_te, expected, rtol=0, atol=0)
    # layout spelled out: blue plane starts at 2048, row-major 32x32
    blue_pixel = batches[5][0][1, 2048 + 4 * 32 + 5]
    assert x_te[1, 2, 4, 5].item() == np.float32(blue_pixel) / np.float32(255)
    torch.testing.assert_close(y_te, _labels(batches[5:]), rtol=0, atol=0)


def test_per_channel_normalisation_from_training_images(tmp_path, rng):
    batches = random_cifar_batches(rng)
    # give the channels different statistics
    for data, _ in batches[:5]:
        data[:, :1024] //= 4
        data[:, 2048:] = 255 - data[:, 2048:] // 2
    write_cifar_dataset(tmp_path / "cifar-10-batches-py", batches)
    data = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")  # root = the folder
    train = _images(batches[:5]).astype(np.float64) / 255
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    torch.testing.assert_close(data.mean.double(), torch.from_numpy(mean), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(data.std.double(), torch.from_numpy(std), rtol=1e-6, atol=1e-7)
    for (x, _), part in ((data.train, batches[:5]), (data.test, batches[5:])):
        pixels = _images(part).astype(np.float64) / 255
        expected = (pixels - mean[:, None, None]) / std[:, None, None]
        torch.testing.assert_close(x.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    channel_means = data.train[0].double().mean(dim=(0, 2, 3))
    assert channel_means.abs().max() < 1e-5


@pytest.mark.parametrize("missing", ["folder", "all", "test_batch"])
def test_missing_files_name_every_expected_path(tmp_path, rng, missing):
    root = tmp_path / "data"
    if missing == "all":
        root.mkdir()
    elif missing == "test_batch":
        write_cifar_dataset(root / "cifar-10-batches-py", random_cifar_batches(rng))
        (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", root=root)
    for fname in FILES:
        assert str(root / "cifar-10-batches-py" / fname) in str(err.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad_batch(rng, kind: str, marker) -> bytes:
    data, labels = rng.integers(0, 256, (4, 3072), dtype=np.uint8), [1, 2, 3, 4]
    if kind == "not_pickle":
        return b"\x00garbage, not a pickle" * 3
    if kind == "truncated":
        return cifar_pickle(data, labels)[:-20]
    if kind == "no_labels":
        return pickle.dumps({b"data": data})
    if kind == "not_dict":
        return pickle.dumps([data, labels])
    if kind == "width":
        return cifar_pickle(data[:, :3071], labels)
    if kind == "dtype":
        return cifar_pickle(data.astype(np.int16), labels)
    if kind == "count":
        return cifar_pickle(data, labels[:3])
    if kind == "label_range":
        return cifar_pickle(data, [0, 1, 10, 2])
    if kind == "exploit":
        return pickle.dumps({b"data": data, b"labels": labels, b"x": _Exploit(marker)})
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("not_pickle", "not a CIFAR-10 batch pickle"),
        ("truncated", "not a CIFAR-10 batch pickle"),
        ("no_labels", "expected a dict"),
        ("not_dict", "expected a dict"),
        ("width", r"shape \(N, 3072\)"),
        ("dtype", "must be uint8"),
        ("count", "size mismatch"),
        ("label_range", r"0\.\.9"),
        ("exploit", "refusing to load posix.mkdir|refusing to load os.mkdir"),
    ],
)
def test_corrupted_batches(tmp_path, rng, kind, match):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_dataset(folder, random_cifar_batches(rng))
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(_bad_batch(rng, kind, marker))
    with pytest.raises(ValueError, match=match) as err:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_3" in str(err.value)
    assert not marker.exists()
