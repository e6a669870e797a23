"""Pruning with OPD and the baselines: scores → masks → compression (SPEC §4, §6, §7)."""

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

__all__ = [
    "OnlinePruning",
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
