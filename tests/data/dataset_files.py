"""Writers of tiny files in the on-disk formats the data loaders read (IDX, CIFAR pickles)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
    """``array`` (uint8) encoded as an IDX file; ``magic`` overrides the first 4 bytes."""
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    sizes = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + sizes + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path: Path, payload: bytes, gz: bool = False) -> Path:
    """Write ``payload`` to ``path`` (``path.gz``, compressed, when ``gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_idx_dataset(folder: Path, splits: dict, gz: bool = False) -> None:
    """Write {"train"|"t10k": (images, labels)} as the four MNIST-style IDX files."""
    for prefix, (images, labels) in splits.items():
        write_file(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write_file(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)


def random_idx_splits(rng: np.random.Generator, n_train: int = 7, n_test: int = 5) -> dict:
    return {
        "train": (
            rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train, dtype=np.uint8),
        ),
        "t10k": (
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test, dtype=np.uint8),
        ),
    }


def cifar_pickle(data, labels, protocol: int = 4, legacy_numpy: bool = False) -> bytes:
    """A CIFAR-10 batch pickle; ``legacy_numpy`` spells numpy's module as numpy 1.x did."""
    payload = pickle.dumps({b"batch_label": b"test", b"data": data, b"labels": labels}, protocol)
    if legacy_numpy:
        assert protocol <= 2, "the module name is only plain text in protocols 0-2"
        payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return payload


def random_cifar_batches(rng: np.random.Generator, sizes=(3, 1, 2, 4, 2), n_test: int = 3):
    """Six (data (N, 3072) uint8, labels list[int]) batches: data_batch_1..5 and test_batch."""
    return [
        (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
        for n in (*sizes, n_test)
    ]


def write_cifar_dataset(folder: Path, batches, **pickle_kw) -> None:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for fname, (data, labels) in zip(names, batches, strict=True):
        write_file(folder / fname, cifar_pickle(data, labels, **pickle_kw))
