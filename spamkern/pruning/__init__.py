"""Pruning with OPD and the baselines: scores → masks → compression."""

from spamkern.pruning.compress import (
    compress,
    compression_report,
    count_flops,
    count_params,
    measure_latency,
)
from spamkern.pruning.finetune import finetune
from spamkern.pruning.masks import (
    PruningMasks,
    apply_masks,
    mask_sparsity,
    prune,
    sparsity_report,
    unit_sparsity,
)
from spamkern.pruning.online import OnlinePruning
from spamkern.pruning.reconstruct import (
    compensate_units,
    input_statistics,
    masked_least_squares,
    reconstruct,
    reconstruct_layer,
)
from spamkern.pruning.saliency import kron_cost, kron_masks, obs_scores, prior_scores
from spamkern.pruning.scores import (
    PosteriorTerms,
    grasp_scores,
    magnitude_scores,
    obd_scores,
    opd_scores,
    posterior_terms,
    random_scores,
    register_posterior_adapter,
    snip_scores,
    synflow_scores,
)
from spamkern.pruning.sparsify import (
    DEFAULT_METHOD,
    RECONSTRUCTIONS,
    SPARSIFY_METHODS,
    SparsifyResult,
    sparsify,
)

__all__ = [
    "DEFAULT_METHOD",
    "RECONSTRUCTIONS",
    "SPARSIFY_METHODS",
    "OnlinePruning",
    "SparsifyResult",
    "compensate_units",
    "input_statistics",
    "kron_cost",
    "kron_masks",
    "masked_least_squares",
    "obs_scores",
    "prior_scores",
    "reconstruct",
    "reconstruct_layer",
    "sparsify",
    "PosteriorTerms",
    "PruningMasks",
    "apply_masks",
    "compress",
    "compression_report",
    "count_flops",
    "count_params",
    "finetune",
    "grasp_scores",
    "magnitude_scores",
    "mask_sparsity",
    "measure_latency",
    "obd_scores",
    "opd_scores",
    "posterior_terms",
    "prune",
    "random_scores",
    "register_posterior_adapter",
    "snip_scores",
    "sparsity_report",
    "synflow_scores",
    "unit_sparsity",
]
