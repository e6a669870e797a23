"""Fine-tuning a pruned model with its masks enforced after every optimiser step.

Every method is fine-tuned with the same optimiser and learning rate (the
original code gave the baselines other learning rates than OPD, which skews comparisons).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spamkern.data.batches import check_batch_size, check_reiterable
from spamkern.progress import progress_bar
from spamkern.pruning.masks import apply_masks
from spamkern.pruning.scores import iterate_batches
from spamkern.validation import HALF_OPTIMISER, check_model_params, check_positive_finite

__all__ = ["finetune"]


def _shuffled(data, batch_size: int, generator: torch.Generator):
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        return iterate_batches((x[perm], y[perm]), batch_size)
    return iterate_batches(data, batch_size)


def finetune(
    model: nn.Module,
    data,
    masks: dict[str, torch.Tensor] | None,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on cross-entropy; returns the mean loss of each epoch.

    ``data`` is a tuple (X, y) (reshuffled each epoch with ``seed``) or an iterable of
    batches. Masked entries are zeroed before training and after every step.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    check_positive_finite("lr", lr)
    if check_batch_size(batch_size) is None:
        raise ValueError("batch_size must be a positive integer, got None")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if epochs > 1:
        check_reiterable(data)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
    check_model_params(params, "finetune", HALF_OPTIMISER)
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    generator = torch.Generator().manual_seed(seed)
    apply_masks(model, masks)
    model.train()
    losses = []
    for epoch in progress_bar(
        range(1, epochs + 1), desc="fine-tune", enabled=progress, leave=False
    ):
        total, count = 0.0, 0
        for x, y in _shuffled(data, batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            apply_masks(model, masks)
            total += float(loss.detach()) * y.shape[0]
            count += y.shape[0]
        if count == 0:
            raise ValueError(f"the fine-tuning data yielded no samples in epoch {epoch}")
        if not math.isfinite(total):
            raise ValueError(
                f"the fine-tuning loss became {total / count} in epoch {epoch}; lower lr or "
                "check the data for NaN/Inf"
            )
        losses.append(total / count)
    return losses
