"""One way to walk over training data: DataLoaders, iterables of batches, or in-memory tensors.

In-memory ``(X, y)`` tensors are moved to the device once and sliced there: no per-sample
collation, which costs several times a whole GPU sweep (BENCH.md §1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

Batch = tuple[Any, torch.Tensor]


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
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.X = X.to(device) if device is not None else X
        self.y = y.to(self.X.device)
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
    in-memory ``(X, y)`` tuple of tensors, which is batched on ``device``.
    """
    if isinstance(data, TensorBatches):
        return data
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        X, y = data
        return TensorBatches(X, y, batch_size or min(256, X.shape[0]), shuffle, generator, device)
    if isinstance(data, torch.Tensor):
        raise TypeError("pass in-memory data as a tuple (X, y) of tensors, not a single tensor")
    if not isinstance(data, Iterable) or isinstance(data, str | bytes | Mapping):
        raise TypeError(
            "training data must be a DataLoader / iterable of (x, y) or dict batches, or a "
            f"tuple (X, y) of tensors; got {type(data).__name__}"
        )
    return data


def split_batch(
    batch: Any, device: torch.device, dict_key_y: str = "labels"
) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of one batch on ``device``; dict batches keep the whole dict as
    the model input (as laplace-torch does) and take targets from ``dict_key_y``."""
    if isinstance(batch, Mapping):
        if dict_key_y not in batch:
            raise ValueError(
                f"a dict batch must hold its targets under {dict_key_y!r}; keys: {list(batch)}"
            )
        x = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return x, batch[dict_key_y].to(device)
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, torch.Tensor):
            x = x.to(device)
        return x, y.to(device)
    raise TypeError(
        "each batch must be an (x, y) tuple or a dict with the targets under "
        f"{dict_key_y!r}; got {type(batch).__name__}"
    )
