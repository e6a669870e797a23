"""Adam steps on the negative log evidence: the hyperparameter update marglik_train runs.

``make_hyper_optimizer(method, prior, ...)`` returns an object whose ``step(posterior)``
updates the prior's log precisions (and log σ) in place on a fitted posterior and returns
the final log marginal likelihood; ``state_dict``/``load_state_dict`` go into checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from spamkern.posterior.laplace import LaplacePosterior
from spamkern.prior.priors import Prior

HYPER_OPTIMIZERS = ("adam",)


class AdamHyper:
    """``n_steps`` Adam steps (learning rate ``lr``) on −log p(D | δ)/N w.r.t. log δ (and log σ)."""

    def __init__(
        self,
        prior: Prior,
        *,
        log_sigma: torch.Tensor | None = None,
        learn_sigma: bool = False,
        lr: float = 0.1,
        n_steps: int = 100,
    ):
        self.prior = prior
        self.log_sigma = log_sigma if learn_sigma else None
        params = [prior.log_precision] + ([log_sigma] if self.log_sigma is not None else [])
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.n_steps = n_steps

    def _evidence(self, posterior: LaplacePosterior) -> torch.Tensor:
        sigma = None if self.log_sigma is None else self.log_sigma.exp()
        return posterior.log_marginal_likelihood(sigma_noise=sigma)

    def step(self, posterior: LaplacePosterior) -> float:
        for _ in range(self.n_steps):
            self.optimizer.zero_grad(set_to_none=True)
            (-self._evidence(posterior) / posterior.n_data).backward()
            self.optimizer.step()
        with torch.no_grad():
            value = self._evidence(posterior)
        if not torch.isfinite(value) or not bool(torch.isfinite(self.prior.log_precision).all()):
            raise ValueError(
                "the marginal likelihood or the prior precisions became non-finite during the "
                "hypersteps; lower lr_hyp or n_hypersteps"
            )
        return float(value)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def make_hyper_optimizer(
    method: str,
    prior: Prior,
    *,
    log_sigma: torch.Tensor | None = None,
    learn_sigma: bool = False,
    lr: float = 0.1,
    n_steps: int = 100,
) -> AdamHyper:
    if method not in HYPER_OPTIMIZERS:
        raise ValueError(f"hyper_optimizer must be one of {HYPER_OPTIMIZERS}, got {method!r}")
    return AdamHyper(prior, log_sigma=log_sigma, learn_sigma=learn_sigma, lr=lr, n_steps=n_steps)
