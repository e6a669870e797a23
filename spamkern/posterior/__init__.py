"""Laplace posterior: fitting, log marginal likelihood, precision diagonal, predictive."""

from spamkern.posterior.fit import fit_laplace
from spamkern.posterior.laplace import LaplacePosterior

__all__ = ["LaplacePosterior", "fit_laplace"]
