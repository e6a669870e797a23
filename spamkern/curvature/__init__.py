"""Curvature: which tensor gets which block, likelihoods, and the accumulation pass."""

from spamkern.curvature.accumulate import Curvature, accumulate_curvature
from spamkern.curvature.likelihood import CURVATURES, LIKELIHOODS
from spamkern.curvature.structure import STRUCTURES, ParamBlock, parameter_blocks

__all__ = [
    "CURVATURES",
    "LIKELIHOODS",
    "STRUCTURES",
    "Curvature",
    "ParamBlock",
    "accumulate_curvature",
    "parameter_blocks",
]
