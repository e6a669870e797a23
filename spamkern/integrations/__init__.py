"""Bridges to other libraries. Each submodule imports its library on first use only.

* :mod:`spamkern.integrations.laplace` — spamkern as a curvature backend of laplace-torch
  (``KronLaplace``, ``DiagLaplace``, ``marglik_training``), and fitted laplace-torch objects
  as input to :func:`spamkern.opd_scores` / :func:`spamkern.prune`.
"""

__all__ = ["laplace"]
