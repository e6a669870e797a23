"""``fit_laplace``: one curvature pass over the data, then a posterior object."""

from __future__ import annotations

import torch
from torch import nn

from spamkern.curvature.accumulate import accumulate_curvature
from spamkern.curvature.likelihood import check_curvature, check_likelihood
from spamkern.curvature.structure import parameter_blocks
from spamkern.data.batches import as_batches
from spamkern.distributed import all_reduce_curvature
from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior.priors import Prior, make_prior
from spamkern.validation import (
    check_input_dtype,
    check_model_params,
    check_positive_finite,
    check_sigma_noise,
)


def fit_laplace(
    model: nn.Module,
    train_data,
    likelihood: str = "classification",
    structure: str = "kron",
    curvature: str = "ggn",
    prior: str | Prior = "layerwise",
    prior_precision=1.0,
    temperature: float = 1.0,
    sigma_noise: float | torch.Tensor = 1.0,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    dict_key_y: str = "labels",
    distributed: bool | None = None,
    input_factors: dict[int, torch.Tensor] | None = None,
) -> LaplacePosterior:
    """Fit a Laplace posterior at the model's current parameters.

    ``train_data``: a DataLoader / iterable of ``(x, y)`` or dict batches, or ``(X, y)``
    tensors (batched on the model's device, ``batch_size`` rows at a time). ``prior`` is a
    prior name (a fresh prior initialised to ``temperature · prior_precision``) or an existing
    :class:`~spamkern.prior.Prior` (kept as is, e.g. the one marginal likelihood is training).
    Under ``torch.distributed`` (``distributed=None`` means "if initialised") each rank
    passes its own shard and the sums are all-reduced once. ``input_factors`` (block index
    → Kronecker A, divided by N) are used as given instead of accumulated: the data-only A
    of a first layer is the same in every pass over the same inputs (single process only).
    """
    check_likelihood(likelihood)
    check_curvature(curvature)
    check_positive_finite("temperature", temperature)
    check_sigma_noise(sigma_noise, likelihood)
    blocks = parameter_blocks(model, structure)
    check_model_params([b.param for b in blocks], "fit_laplace")
    device = blocks[0].param.device
    batches = as_batches(train_data, batch_size=batch_size, device=device)
    check_input_dtype(batches, blocks[0].param.dtype)
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and input_factors:
        raise ValueError("input_factors are global sums; they cannot be given under distributed")
    result = accumulate_curvature(
        model,
        batches,
        blocks,
        likelihood,
        curvature,
        generator,
        progress,
        dict_key_y,
        input_factors=input_factors,
    )
    if distributed:
        all_reduce_curvature(result)
    if isinstance(prior, Prior):
        names = [b.name for b in blocks]
        if [s.name for s in prior.slots] != names:
            raise ValueError(
                "the given prior was built for other parameters: "
                f"{[s.name for s in prior.slots]} vs the model's {names}"
            )
        prior_module = prior
    else:
        prior_module = make_prior(
            prior, [(b.name, b.param) for b in blocks], prior_precision, temperature
        )
    return LaplacePosterior(
        model, result, prior_module, likelihood, structure, curvature, temperature, sigma_noise
    )
