"""Reader for CIFAR-10's python batches (``cifar-10-batches-py/data_batch_1`` ... ``test_batch``).

Each batch is a pickled dict with ``b"data"`` (N x 3072 uint8, the red, green and blue planes
of a 32x32 image one after another) and ``b"labels"`` (N ints). Pickles can run arbitrary
code, so the unpickler here only admits the few numpy names that an array needs; any other
object in the file is reported as corruption instead of being imported.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (3, 32, 32)
N_CLASSES = 10

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes under pickle protocol 2
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-rebuilding names."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith(("numpy.core.", "numpy._core.")):
            # numpy 2 renamed numpy.core to numpy._core; files carry either spelling
            submodule = module.split(".", 2)[2]
            for package in ("numpy._core", "numpy.core"):
                try:
                    return super().find_class(f"{package}.{submodule}", name)
                except ModuleNotFoundError:
                    continue
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR-10 batch file.

    Raises ValueError when the file is not such a pickle, lacks ``b"data"``/``b"labels"``,
    or holds arrays of the wrong size or labels outside 0..9.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
        except Exception as err:  # a damaged pickle fails in many ways; all mean "corrupted"
            raise ValueError(f"{path}: not a CIFAR-10 batch pickle ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f'{path}: expected a dict with b"data" and b"labels", got {keys}')
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    n_pixels = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != n_pixels:
        raise ValueError(
            f'{path}: b"data" must be uint8 of shape (N, {n_pixels}), '
            f"got {data.dtype} {tuple(data.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"{path}: size mismatch, {data.shape[0]} images but labels of shape "
            f"{tuple(labels.shape)}"
        )
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= N_CLASSES
    ):
        raise ValueError(f"{path}: labels must be integers in 0..{N_CLASSES - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)
