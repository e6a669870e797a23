"""MNIST / FashionMNIST from tiny IDX files written here: round trips, layouts and errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from dataset_files import idx_bytes, random_idx_splits, write_file, write_idx_dataset

from spamkern.data import load_dataset
from spamkern.data.idx import read_idx

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture
def rng():
    return np.random.default_rng()


def _as_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32))[:, None] / 255.0


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_exact_round_trip(tmp_path, rng, name, gz):
    splits = random_idx_splits(rng, n_train=7, n_test=5)
    write_idx_dataset(tmp_path / FOLDERS[name] / "raw", splits, gz=gz)
    data = load_dataset(name, root=tmp_path, normalize=False)
    assert (data.name, data.n_classes, data.input_shape) == (name, 10, (1, 28, 28))
    assert data.mean is None and data.std is None
    for (x, y), key in ((data.train, "train"), (data.test, "t10k")):
        images, labels = splits[key]
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        torch.testing.assert_close(x, _as_pixels(images), rtol=0, atol=0)
        torch.testing.assert_close(y, torch.from_numpy(labels.astype(np.int64)), rtol=0, atol=0)
        assert x.min() >= 0 and x.max() <= 1


def test_normalisation_uses_training_statistics(tmp_path, rng):
    splits = random_idx_splits(rng, n_train=9, n_test=4)
    splits["train"] = (splits["train"][0] // 3, splits["train"][1])  # test stats now differ
    write_idx_dataset(tmp_path / "MNIST" / "raw", splits)
    data = load_dataset("mnist", root=tmp_path)
    train_pixels = splits["train"][0].astype(np.float64) / 255
    mean, std = train_pixels.mean(), train_pixels.std()
    torch.testing.assert_close(data.mean.double(), torch.tensor([mean], dtype=torch.float64))
    torch.testing.assert_close(data.std.double(), torch.tensor([std], dtype=torch.float64))
    for (x, _), key in ((data.train, "train"), (data.test, "t10k")):
        expected = (splits[key][0][:, None].astype(np.float64) / 255 - mean) / std
        torch.testing.assert_close(x.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    assert abs(data.train[0].double().mean()) < 1e-5
    assert abs(data.test[0].double().mean()) > 0.1


@pytest.mark.parametrize("layout", ["standard", "dataset_folder", "raw_folder", "env"])
def test_accepted_layouts(tmp_path, rng, layout, monkeypatch):
    splits = random_idx_splits(rng, n_train=3, n_test=2)
    folder = {
        "standard": tmp_path / "FashionMNIST" / "raw",
        "dataset_folder": tmp_path / "FashionMNIST" / "raw",
        "raw_folder": tmp_path / "somewhere",
        "env": tmp_path / "FashionMNIST" / "raw",
    }[layout]
    write_idx_dataset(folder, splits)
    root = {
        "standard": tmp_path,
        "dataset_folder": tmp_path / "FashionMNIST",
        "raw_folder": folder,
        "env": None,
    }[layout]
    if layout == "env":
        monkeypatch.setenv("SPAMKERN_DATA", str(tmp_path))
    data = load_dataset("fashion_mnist", root=root, normalize=False)
    torch.testing.assert_close(data.test[0], _as_pixels(splits["t10k"][0]), rtol=0, atol=0)


def test_plain_file_wins_over_gzip_and_mixed_files_load(tmp_path, rng):
    folder = tmp_path / "MNIST" / "raw"
    plain, other = random_idx_splits(rng), random_idx_splits(rng)
    write_idx_dataset(folder, plain)
    write_idx_dataset(folder, other, gz=True)
    (folder / "t10k-labels-idx1-ubyte").unlink()  # this one only as .gz now
    data = load_dataset("mnist", root=tmp_path, normalize=False)
    torch.testing.assert_close(data.train[0], _as_pixels(plain["train"][0]), rtol=0, atol=0)
    expected_labels = torch.from_numpy(other["t10k"][1].astype(np.int64))
    torch.testing.assert_close(data.test[1], expected_labels, rtol=0, atol=0)


def test_read_idx_odd_shape_round_trip(tmp_path, rng):
    array = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    for gz in (False, True):
        path = write_file(tmp_path / f"odd{gz}", idx_bytes(array), gz=gz)
        np.testing.assert_array_equal(read_idx(path, ndim=3), array)


def test_root_required(tmp_path):
    with pytest.raises(ValueError, match="SPAMKERN_DATA"):
        load_dataset("mnist")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("missing", ["folder", "all", "one"])
def test_missing_files_name_every_expected_path(tmp_path, rng, name, missing):
    root = tmp_path / "data"
    if missing == "one":
        write_idx_dataset(root / FOLDERS[name] / "raw", random_idx_splits(rng))
        (root / FOLDERS[name] / "raw" / "train-labels-idx1-ubyte").unlink()
    elif missing == "all":
        root.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=root)
    message = str(err.value)
    for fname in FILES:
        assert str(root / FOLDERS[name] / "raw" / fname) in message
    assert (".gz" in message) and (("does not exist" in message) == (missing == "folder"))


def _corrupt(tmp_path, rng, fname: str, payload: bytes) -> None:
    folder = tmp_path / "MNIST" / "raw"
    write_idx_dataset(folder, random_idx_splits(rng))
    (folder / fname).write_bytes(payload)


@pytest.mark.parametrize(
    "fname, make, match",
    [
        ("train-images-idx3-ubyte", lambda a: idx_bytes(a, magic=b"\x00\x00\x08\x01"), "magic"),
        ("train-images-idx3-ubyte", lambda a: idx_bytes(a, magic=b"\x00\x00\x0b\x03"), "magic"),
        ("train-images-idx3-ubyte", lambda a: idx_bytes(a, magic=b"\x08\x03\x00\x00"), "magic"),
        ("train-images-idx3-ubyte", lambda a: idx_bytes(a)[:-1], "size mismatch"),
        ("train-images-idx3-ubyte", lambda a: idx_bytes(a) + b"\x00", "size mismatch"),
        ("train-images-idx3-ubyte", lambda a: idx_bytes(a)[:9], "ends before"),
        ("t10k-images-idx3-ubyte", lambda a: b"\x00\x00", "too short"),
        ("t10k-labels-idx1-ubyte", lambda a: idx_bytes(a[:, 0, 0]), "size mismatch"),
    ],
    ids=["ndim", "dtype", "order", "short", "long", "header", "tiny", "count"],
)
def test_corrupted_headers(tmp_path, rng, fname, make, match):
    # "count": 7 labels written for 5 test images
    array = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    _corrupt(tmp_path, rng, fname, make(array))
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist", root=tmp_path)


def test_bad_gzip_and_bad_labels(tmp_path, rng):
    folder = tmp_path / "MNIST" / "raw"
    splits = random_idx_splits(rng)
    write_idx_dataset(folder, splits, gz=True)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all" * 4)
    with pytest.raises(ValueError, match="cannot be read as an IDX file"):
        load_dataset("mnist", root=tmp_path)
    truncated = gzip.compress(idx_bytes(splits["t10k"][0]))[:-12]
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(truncated)
    with pytest.raises(ValueError, match="cannot be read as an IDX file"):
        load_dataset("mnist", root=tmp_path)

    splits["train"][1][rng.integers(len(splits["train"][1]))] = 10
    write_idx_dataset(folder, splits)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        load_dataset("mnist", root=tmp_path)
