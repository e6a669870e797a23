"""The data sets of the SpaM experiments as ready train/test tensors, without a network.

* ``breast_cancer``: scikit-learn's copy (569 x 30, 2 classes), 80/20 stratified split drawn
  with ``seed``; features standardised with the TRAIN split's mean and (population) std.
* ``digits``: scikit-learn's 8x8 digits (1797 images, 10 classes) as 1x8x8 pixels in [0, 1],
  80/20 stratified split. Kept in [0, 1] whatever ``normalize`` says: it is the small MNIST
  stand-in and is used at that scale.
* ``digits28``: the same images and split, upsampled to 1x28x28 by bilinear interpolation
  (corners aligned: output pixel i samples the 8x8 image at position i·7/27); pixels stay
  in [0, 1] like ``digits``. It gives a LeNet-5-shaped network (whose
  first Linear layer follows conv + ReLU + pooling) real data that ships with
  scikit-learn, deterministic and offline.
* ``mnist``, ``fashion_mnist``: 1x28x28 pixels in [0, 1] read from torchvision's on-disk IDX
  files; ``normalize`` standardises them with the training images' mean and std.
* ``cifar10``: 3x32x32 pixels read from the python batches; ``normalize`` standardises each
  colour channel with the training images' statistics.

MNIST, FashionMNIST and CIFAR-10 come with a fixed train/test split, so ``seed`` does not
affect them. Their folder is ``root`` (or the environment variable ``SPAMKERN_DATA``), laid
out as torchvision writes it; ``root`` may also point straight at the folder holding the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spamkern.data.cifar import read_cifar_batch
from spamkern.data.idx import read_idx

DATASETS = ("breast_cancer", "digits", "digits28", "mnist", "fashion_mnist", "cifar10")
ROOT_ENV = "SPAMKERN_DATA"
TEST_FRACTION = 0.2

_IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


@dataclass(frozen=True)
class DatasetSplit:
    """Train and test tensors of one data set (inputs float32, labels int64).

    ``mean``/``std`` are the statistics the inputs were standardised with (per feature or
    per channel, from the training split), or None when the inputs are not standardised;
    apply them to new inputs as ``(x - mean) / std``.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    n_classes: int
    input_shape: tuple[int, ...]
    name: str
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None


def dataset_names() -> tuple[str, ...]:
    """The names :func:`load_dataset` accepts."""
    return DATASETS


def load_dataset(
    name: str, root: str | os.PathLike | None = None, seed: int = 0, normalize: bool = True
) -> DatasetSplit:
    """Load data set ``name`` (one of :data:`DATASETS`) as a :class:`DatasetSplit`.

    ``root`` is only read for mnist, fashion_mnist and cifar10; ``seed`` only drives the
    split of breast_cancer, digits and digits28. Raises ValueError for an unknown name or a
    corrupted file, FileNotFoundError (naming every expected path) when files are missing.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {DATASETS}; got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; accepted names: {', '.join(DATASETS)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return _LOADERS[key](key, root, int(seed), bool(normalize))


# ---------------------------------------------------------------- scikit-learn tables


def _load_breast_cancer(name: str, root, seed: int, normalize: bool) -> DatasetSplit:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = _stratified_split(x, y, seed)
    mean = std = None
    if normalize:
        mean = x_train.mean(axis=0)
        std = _nonzero(x_train.std(axis=0))
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        mean, std = _as_float(mean), _as_float(std)
    return DatasetSplit(
        train=(_as_float(x_train), _as_labels(y_train)),
        test=(_as_float(x_test), _as_labels(y_test)),
        n_classes=2,
        input_shape=(x.shape[1],),
        name=name,
        mean=mean,
        std=std,
    )


def _load_digits(name: str, root, seed: int, normalize: bool) -> DatasetSplit:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images[:, None] / 16.0, digits.target  # pixel values are 0..16
    x_train, x_test, y_train, y_test = _stratified_split(x, y, seed)
    return DatasetSplit(
        train=(_as_float(x_train), _as_labels(y_train)),
        test=(_as_float(x_test), _as_labels(y_test)),
        n_classes=10,
        input_shape=(1, 8, 8),
        name=name,
    )


DIGITS28_SIZE = 28


def _load_digits28(name: str, root, seed: int, normalize: bool) -> DatasetSplit:
    """``digits`` (same split for the same seed) bilinearly upsampled to 28x28."""
    small = _load_digits("digits", root, seed, normalize)
    return DatasetSplit(
        train=(upsample_bilinear(small.train[0], DIGITS28_SIZE), small.train[1]),
        test=(upsample_bilinear(small.test[0], DIGITS28_SIZE), small.test[1]),
        n_classes=small.n_classes,
        input_shape=(1, DIGITS28_SIZE, DIGITS28_SIZE),
        name=name,
    )


def upsample_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) images → (N, C, size, size), bilinear with aligned corners, computed in
    float64 so the result does not depend on the thread count or the float32 rounding path."""
    import torch.nn.functional as F

    out = F.interpolate(images.double(), size=(size, size), mode="bilinear", align_corners=True)
    return out.clamp_(0.0, 1.0).to(images.dtype).contiguous()


def _stratified_split(x: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)


# ---------------------------------------------------------------- image folders


def _load_idx_dataset(name: str, root, seed: int, normalize: bool) -> DatasetSplit:
    folder = _IDX_FOLDERS[name]
    base = _resolve_root(name, root)
    wanted = [f for pair in _IDX_FILES.values() for f in pair]
    files = _locate(name, base, [base / folder / "raw", base / "raw", base], wanted, gz=True)
    splits = {}
    for split, (image_file, label_file) in _IDX_FILES.items():
        images = read_idx(files[image_file], ndim=3)
        labels = read_idx(files[label_file], ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"size mismatch: {files[image_file]} holds {images.shape[0]} images but "
                f"{files[label_file]} holds {labels.shape[0]} labels"
            )
        _check_labels(labels, 10, files[label_file])
        splits[split] = (images[:, None], labels)
    return _image_split(name, splits, 10, normalize, files[_IDX_FILES["test"][0]])


def _load_cifar10(name: str, root, seed: int, normalize: bool) -> DatasetSplit:
    base = _resolve_root(name, root)
    wanted = [*_CIFAR_TRAIN, _CIFAR_TEST]
    files = _locate(name, base, [base / _CIFAR_FOLDER, base], wanted, gz=False)
    batches = [read_cifar_batch(files[f]) for f in _CIFAR_TRAIN]
    splits = {
        "train": (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])),
        "test": read_cifar_batch(files[_CIFAR_TEST]),
    }
    return _image_split(name, splits, 10, normalize, files[_CIFAR_TEST])


def _image_split(name: str, splits: dict, n_classes: int, normalize: bool, test_path: Path):
    """Scale uint8 images (N, C, H, W) to [0, 1] and optionally standardise per channel."""
    train_images, test_images = splits["train"][0], splits["test"][0]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"size mismatch: training images are {train_images.shape[1:]} but {test_path} "
            f"holds {test_images.shape[1:]}"
        )
    mean = std = None
    if normalize:
        mean, std = _channel_stats(train_images)
    tensors = {}
    for split, (images, labels) in splits.items():
        x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
        if normalize:
            x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
        tensors[split] = (x, _as_labels(labels))
    return DatasetSplit(
        train=tensors["train"],
        test=tensors["test"],
        n_classes=n_classes,
        input_shape=tuple(int(s) for s in train_images.shape[1:]),
        name=name,
        mean=mean,
        std=std,
    )


def _channel_stats(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and population std of uint8 images scaled to [0, 1].

    Counting the 256 pixel values per channel gives the moments in float64 without a float
    copy of the whole training set.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        if total == 0:
            raise ValueError("cannot standardise an empty training set; pass normalize=False")
        mean = counts @ values / total
        means.append(mean)
        stds.append(np.sqrt(counts @ (values - mean) ** 2 / total))
    return _as_float(np.array(means)), _as_float(_nonzero(np.array(stds)))


def _resolve_root(name: str, root) -> Path:
    if root is None:
        root = os.environ.get(ROOT_ENV)
        if not root:
            raise ValueError(
                f"{name} is read from a local folder in torchvision's layout (it cannot be "
                f"downloaded here): pass root=... or set {ROOT_ENV}"
            )
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be a str or path, got {type(root).__name__}")
    return Path(root).expanduser()


def _locate(
    name: str, root: Path, folders: list[Path], wanted: list[str], gz: bool
) -> dict[str, Path]:
    """Map each wanted file name to its path in the first folder that holds all of them.

    A plain file wins over its ``.gz`` twin. When no folder is complete, the error lists
    every expected path in the standard layout and the other folders that were searched.
    """
    folders = list(dict.fromkeys(folders))
    for folder in folders:
        found = {}
        for fname in wanted:
            options = [folder / fname] + ([folder / f"{fname}.gz"] if gz else [])
            hit = next((p for p in options if p.is_file()), None)
            if hit is None:
                break
            found[fname] = hit
        else:
            return found
    why = "does not exist" if not root.exists() else "lacks the files"
    expected = "\n".join(f"  {folders[0] / f}" for f in wanted)
    others = ", ".join(str(f) for f in folders[1:])
    suffix = " (each may also end in .gz)" if gz else ""
    raise FileNotFoundError(
        f"{name}: folder {root} {why}. Expected{suffix}:\n{expected}\n"
        f"(also searched {others} for the same file names)"
    )


# ---------------------------------------------------------------- small helpers


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> None:
    if labels.size and labels.max() >= n_classes:
        raise ValueError(f"{path}: labels must lie in 0..{n_classes - 1}, found {labels.max()}")


def _nonzero(std: np.ndarray) -> np.ndarray:
    """Constant features/channels keep their values (std 1) instead of becoming NaN."""
    return np.where(std > 0, std, 1.0)


def _as_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _as_labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


_LOADERS: dict[str, Callable[..., DatasetSplit]] = {
    "breast_cancer": _load_breast_cancer,
    "digits": _load_digits,
    "digits28": _load_digits28,
    "mnist": _load_idx_dataset,
    "fashion_mnist": _load_idx_dataset,
    "cifar10": _load_cifar10,
}
