"""Small models, data and a stand-in posterior shared by the pruning tests."""

from __future__ import annotations

import torch
from torch import nn


class DiagPosterior:
    """A diagonal Gaussian posterior with the attributes spamkern's posteriors expose."""

    def __init__(
        self, model: nn.Module, curvature: torch.Tensor, prior: torch.Tensor, scale: float
    ):
        self.model = model
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.mean = torch.cat([p.detach().reshape(-1) for _, p in self.named_params])
        self._curvature = curvature
        self.curvature_scale = scale
        prior_vec = prior

        class _Prior(nn.Module):
            def precision_diag(self) -> torch.Tensor:
                return prior_vec

        self.prior = _Prior()

    def curvature_diag(self) -> torch.Tensor:
        return self._curvature

    def precision_diag(self) -> torch.Tensor:
        return self.curvature_scale * self._curvature + self.prior.precision_diag()

    def covariance_diag(self) -> torch.Tensor:
        return 1.0 / self.precision_diag()

    def functional_variance(self, J: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bcp,p,bdp->bcd", J, 1.0 / self.precision_diag(), J)


def make_mlp(dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 3)
    ).to(dtype)


def make_cnn(dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, padding=1),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 9),
        nn.ReLU(),
        nn.Linear(9, 4),
    ).to(dtype)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def classification_data(n: int, shape: tuple[int, ...], n_classes: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y
