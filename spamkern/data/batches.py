"""One way to walk over training data: DataLoaders, iterables of batches, or in-memory tensors.

In-memory ``(X, y)`` tensors are moved to the device once and sliced there: no per-sample
collation, which costs several times a whole GPU sweep.

Training walks the data once per epoch, so the data must be *re-iterable*: a DataLoader
(map-style or over an ``IterableDataset``), a list of batches, or ``(X, y)`` tensors. A
one-shot iterator or generator is refused (:func:`check_reiterable`): after the first pass
it is empty, and every later epoch would train on nothing. :func:`epoch_size` gives the
samples and optimiser steps of one epoch without loading data where the loader can tell
(its sampler's length, ``drop_last`` and custom samplers included), else by one counting pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset

Batch = tuple[Any, torch.Tensor]


def check_batch_size(batch_size: Any) -> int | None:
    """``None`` (the default) or a positive integer; anything else is refused, not replaced."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer or None (the default), got {batch_size!r}"
        )
    return batch_size


def check_reiterable(data: Any) -> None:
    """Refuse one-shot iterators: they can be walked once, but training needs one pass per
    epoch (and one more for the posterior)."""
    if isinstance(data, Iterator):
        raise TypeError(
            f"the training data is a one-shot iterator ({type(data).__name__}): it is "
            "exhausted after one pass, but training walks the data once per epoch. Pass a "
            "DataLoader, a list of (x, y) batches, or (X, y) tensors"
        )


class TensorBatches:
    """Device-side batches over in-memory tensors, optionally shuffled by a generator."""

    def __init__(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ):
        if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("in-memory data must be a tuple (X, y) of torch tensors")
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
        if X.shape[0] == 0:
            raise ValueError("the training data is empty (X has 0 rows)")
        check_batch_size(batch_size)
        self.X = X.to(device) if device is not None else X
        self.y = _as_targets(y).to(self.X.device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        return -(-self.X.shape[0] // self.batch_size)

    @property
    def n_data(self) -> int:
        return self.X.shape[0]

    def __iter__(self) -> Iterator[Batch]:
        n = self.X.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.X.device)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield self.X[idx], self.y[idx]
        else:
            for start in range(0, n, self.batch_size):
                yield (
                    self.X[start : start + self.batch_size],
                    self.y[start : start + self.batch_size],
                )


def as_batches(
    data: Any,
    batch_size: int | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Iterable:
    """Normalise training data to an iterable of batches.

    Accepts a DataLoader (or any re-iterable of ``(x, y)`` tuples or dict batches) or an
    in-memory ``(X, y)`` tuple of tensors, which is batched on ``device`` (``batch_size``
    rows at a time, default ``min(256, N)``). ``batch_size`` is only for tensors: a loader
    or a list of batches batches itself, so a different ``batch_size`` is ignored with a
    warning.
    """
    batch_size = check_batch_size(batch_size)
    if isinstance(data, TensorBatches):
        return data
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        X, y = data
        if X.ndim == 0 or y.ndim == 0:
            raise ValueError("X and y must have a leading sample dimension, got 0-d tensors")
        return TensorBatches(X, y, batch_size or min(256, X.shape[0]), shuffle, generator, device)
    if isinstance(data, torch.Tensor):
        raise TypeError("pass in-memory data as a tuple (X, y) of tensors, not a single tensor")
    _check_pair_of_tensors(data)
    if isinstance(data, Dataset):  # its items are single samples, not batches
        raise TypeError(
            f"got a {type(data).__name__} (a data set of single samples); wrap it in a "
            "DataLoader(dataset, batch_size=...) or pass (X, y) tensors"
        )
    if not isinstance(data, Iterable) or isinstance(data, str | bytes | Mapping):
        raise TypeError(
            "training data must be a DataLoader / iterable of (x, y) or dict batches, or a "
            f"tuple (X, y) of tensors; got {type(data).__name__}"
        )
    _check_own_batch_size(data, batch_size)
    return data


def _check_pair_of_tensors(data: Any) -> None:
    """``(X, y)`` with one of them not a tensor (a numpy array, a list) would otherwise be
    walked as an iterable of two "batches" and fail with an unrelated message."""
    if not (isinstance(data, tuple | list) and len(data) == 2):
        return
    kinds = [type(t).__name__ for t in data]
    array_like = [isinstance(t, torch.Tensor) or hasattr(t, "__array__") for t in data]
    if any(array_like) and not all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(
            f"in-memory data must be a tuple (X, y) of torch tensors, got ({kinds[0]}, "
            f"{kinds[1]}); convert with torch.as_tensor"
        )


def _check_own_batch_size(data: Iterable, batch_size: int | None) -> None:
    """A loader/iterable that batches itself ignores ``batch_size``: say so."""
    if batch_size is None:
        return
    own = data.batch_size if isinstance(data, DataLoader) else None
    if own != batch_size:
        where = f"its own batch_size={own}" if own is not None else "its own batches"
        warnings.warn(
            f"batch_size={batch_size} is ignored: it applies to (X, y) tensors only, and the "
            f"given {type(data).__name__} yields {where}",
            stacklevel=3,
        )


@dataclass(frozen=True)
class EpochSize:
    """What one pass over the training data holds."""

    n_data: int  # samples
    n_batches: int  # optimiser steps


def epoch_size(batches: Iterable, dict_key_y: str = "labels") -> EpochSize:
    """Samples and batches of one epoch; an empty epoch is an error.

    Read from the loader where it can tell without loading data (in-memory tensors, a
    map-style DataLoader with a sized sampler: ``drop_last``, subset and distributed samplers
    counted exactly); otherwise (an ``IterableDataset``, custom batch samplers, plain lists of
    batches) by one counting pass over the data. For data walked once per epoch: one-shot
    iterators are refused.
    """
    check_reiterable(batches)
    size = _size_without_loading(batches)
    if size is None:
        n_data, n_batches = 0, 0
        for batch in batches:
            n_data += batch_targets(batch, dict_key_y).shape[0]
            n_batches += 1
        size = EpochSize(n_data, n_batches)
    if size.n_data == 0 or size.n_batches == 0:
        raise ValueError(
            f"the training data is empty: one pass over the {type(batches).__name__} yields "
            f"{size.n_batches} batches and {size.n_data} samples"
        )
    return size


def _size_without_loading(batches: Iterable) -> EpochSize | None:
    if isinstance(batches, TensorBatches):
        return EpochSize(batches.n_data, len(batches))
    if not isinstance(batches, DataLoader) or isinstance(batches.dataset, IterableDataset):
        return None
    batch_sampler = batches.batch_sampler
    if type(batch_sampler) is not BatchSampler or not hasattr(batch_sampler.sampler, "__len__"):
        return None
    n_samples = len(batch_sampler.sampler)  # DistributedSampler: this rank's share
    n_batches = len(batch_sampler)
    if batch_sampler.drop_last:
        n_samples = n_batches * batch_sampler.batch_size
    return EpochSize(n_samples, n_batches)


def _as_targets(y: torch.Tensor) -> torch.Tensor:
    """Integer class labels as int64, the one integer type every loss and one_hot accepts
    (int32 labels, e.g. from numpy on Windows, would crash inside cross_entropy)."""
    if y.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        return y.long()
    return y


def batch_targets(batch: Any, dict_key_y: str = "labels") -> torch.Tensor:
    """The targets of one ``(x, y)`` or dict batch, where they are (nothing is moved)."""
    if isinstance(batch, Mapping):
        if dict_key_y not in batch:
            raise ValueError(
                f"a dict batch must hold its targets under {dict_key_y!r}; keys: {list(batch)}"
            )
        y = batch[dict_key_y]
    elif isinstance(batch, tuple | list) and len(batch) >= 2:
        y = batch[1]
    else:
        raise TypeError(
            "each batch must be an (x, y) tuple or a dict with the targets under "
            f"{dict_key_y!r}; got {type(batch).__name__}"
        )
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the targets of a batch must be a tensor, got {type(y).__name__}")
    return y


def split_batch(
    batch: Any, device: torch.device, dict_key_y: str = "labels"
) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of one batch on ``device``; dict batches keep the whole dict as
    the model input (as laplace-torch does) and take targets from ``dict_key_y``."""
    y = _as_targets(batch_targets(batch, dict_key_y)).to(device)
    if isinstance(batch, Mapping):
        return {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }, y
    x = batch[0]
    return (x.to(device) if isinstance(x, torch.Tensor) else x), y
