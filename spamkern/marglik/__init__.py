"""Marginal-likelihood (SpaM) training with checkpoint/resume."""

from spamkern.marglik.training import MarglikResult, is_marglik_epoch, marglik_train

__all__ = ["MarglikResult", "is_marglik_epoch", "marglik_train"]
