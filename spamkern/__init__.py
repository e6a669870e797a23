"""spamkern: fast Laplace marginal-likelihood training and OPD pruning (SpaM).

Pipeline: curvature → prior → posterior → marginal likelihood → scores → masks →
compression → sparse inference. See README.md for the API in twenty lines.
"""

from spamkern.curvature import CURVATURES, LIKELIHOODS, STRUCTURES
from spamkern.posterior import LaplacePosterior, fit_laplace
from spamkern.prior import PRIORS, Prior, make_prior

__version__ = "0.1.0"

# Names whose modules pull in more (pruning, sparse kernels, training loop) load lazily.
_LAZY = {
    "marglik_train": "spamkern.marglik",
    "MarglikResult": "spamkern.marglik",
    "load_dataset": "spamkern.data",
    **dict.fromkeys(
        [
            "opd_scores",
            "prune",
            "compress",
            "apply_masks",
            "finetune",
            "OnlinePruning",
            "magnitude_scores",
            "random_scores",
            "snip_scores",
            "grasp_scores",
            "obd_scores",
            "synflow_scores",
            "compression_report",
            "obs_scores",
            "prior_scores",
            "kron_cost",
            "kron_masks",
            "reconstruct",
            "sparsify",
            "SparsifyResult",
            "SPARSIFY_METHODS",
        ],
        "spamkern.pruning",
    ),
    **dict.fromkeys(
        ["glm_predictive", "map_predictive", "classification_metrics"], "spamkern.metrics"
    ),
    **dict.fromkeys(
        ["BlockSparseLinear", "SemiStructuredLinear", "convert_to_block_sparse"],
        "spamkern.sparse",
    ),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spamkern' has no attribute {name!r}")


__all__ = [
    "CURVATURES",
    "LIKELIHOODS",
    "PRIORS",
    "STRUCTURES",
    "LaplacePosterior",
    "Prior",
    "fit_laplace",
    "make_prior",
    *_LAZY,
]
