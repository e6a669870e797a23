"""spamkern inside laplace-torch (0.3), in both directions.

1. Curvature backends. laplace-torch's ``KronLaplace``, ``DiagLaplace`` and
   ``marglik_training`` take a backend class; :class:`SpamkernGGN` (exact GGN, or the
   one-sample MC-GGN with ``stochastic=True``), :class:`SpamkernGGNMC` (the same, stochastic
   by default, for ``marglik_training`` which cannot pass backend options) and
   :class:`SpamkernEF` compute each batch with :func:`spamkern.curvature.accumulate_curvature`
   and hand the result back in laplace-torch's convention:

   * ``kron(X, y, N)`` → ``(loss, Kron)``: per weight ``[G, A]`` with G = Σ_batch g gᵀ and
     A = Σ_batch a aᵀ / N (the "expand" convention for convolutions), per bias ``[G]``; laplace
     adds these over batches, so the fit is the same for any batching;
   * ``diag(X, y, N)`` → ``(loss, (P,) diagonal)`` summed over the batch;
   * ``loss`` is Σ ℓ_n: cross-entropy, or ½ Σ (f − y)² for regression (σ is applied later by
     laplace-torch's ``_H_factor``).

   Jacobians, per-sample gradients and the dense ``full`` curvature are laplace-torch's own
   (torch.func) implementations, inherited unchanged.

   Two laplace-torch conventions are kept on purpose so numbers compare one to one: the EF of
   the regression likelihood is formed from the gradient of ``MSELoss(reduction="sum")``,
   i.e. it is 2 · Σ (f − y)² J Jᵀ — twice spamkern's own ``curvature="ef"`` — and a
   parameter outside Linear/Conv2d that is 1-D (LayerNorm, BatchNorm) gets its exact diagonal
   as its one Kronecker block. Other tensors outside Linear/Conv2d have no Kronecker form and
   are refused under ``KronLaplace``.

2. The other direction: :func:`from_laplace` turns a fitted ``KronLaplace`` / ``DiagLaplace``
   / ``FullLaplace`` into the posterior interface :func:`spamkern.opd_scores` reads (``.model``,
   ``.named_params``, ``.mean``, ``.curvature_diag()``, ``.prior``, ``.curvature_scale``,
   ``.precision_diag()``). Importing this module also registers that adapter with
   :func:`spamkern.pruning.register_posterior_adapter`, so ``sk.opd_scores(la)`` works directly.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace, DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.lllaplace import LLLaplace
from laplace.subnetlaplace import SubnetLaplace
from laplace.utils import Kron
from torch import nn

from spamkern.curvature.accumulate import Curvature, accumulate_curvature
from spamkern.curvature.structure import ParamBlock, parameter_blocks
from spamkern.ops import kron_curvature_diag

__all__ = [
    "LaplaceTorchPosterior",
    "SpamkernEF",
    "SpamkernGGN",
    "SpamkernGGNMC",
    "from_laplace",
]

# options laplace-torch forwards to ``kron``/``diag`` that spamkern understands
_KFAC_APPROX = ("expand",)


def _likelihood_name(likelihood) -> str:
    """laplace-torch passes plain strings or its ``Likelihood`` str-enum."""
    return str(getattr(likelihood, "value", likelihood))


class _SpamkernCurvature(CurvatureInterface):
    """Shared ``kron``/``diag`` of the spamkern backends (mixed in before GGN/EF)."""

    _curvature_name: str = "ggn"
    generator: torch.Generator | None = None
    num_samples: int = 1

    def _check_call(self, kwargs: dict[str, Any]) -> None:
        if self.subnetwork_indices is not None:
            raise ValueError(
                f"{type(self).__name__} computes Kronecker and diagonal curvature of whole "
                "parameter tensors; SubnetLaplace needs `full` (inherited, works) but not "
                "kron/diag with subnetwork_indices — use SubnetLaplace with this backend's "
                "`full`, or a KronLaplace/DiagLaplace over all weights"
            )
        approx = kwargs.pop("kfac_approx", "expand")
        if approx not in _KFAC_APPROX:
            raise ValueError(
                f"kfac_approx={approx!r} is not available in spamkern; accepted: {_KFAC_APPROX}"
            )
        if kwargs:
            raise TypeError(
                f"{type(self).__name__} got unexpected curvature options {sorted(kwargs)}; "
                "accepted: kfac_approx='expand'"
            )

    def _blocks(self, structure: str) -> list[ParamBlock]:
        cache = self.__dict__.setdefault("_spamkern_blocks", {})
        if structure not in cache:
            blocks = parameter_blocks(self._model, structure)
            names = [b.name for b in blocks]
            expected = [n for n, p in self._model.named_parameters() if p.requires_grad]
            if names != expected:  # parameters shared between modules, ...
                raise ValueError(
                    f"the model's trainable parameters {expected} do not map one to one onto "
                    f"curvature blocks {names}"
                )
            cache[structure] = blocks
        return cache[structure]

    def _accumulate_once(self, x, y: torch.Tensor, structure: str) -> Curvature:
        with torch.enable_grad():  # the pass backpropagates, even if fit() runs under no_grad
            return accumulate_curvature(
                self.model,
                [(x, y)],
                self._blocks(structure),
                _likelihood_name(self.likelihood),
                self._curvature_name,
                generator=self.generator,
                dict_key_y=self.dict_key_y,
            )

    def _accumulate(self, x, y: torch.Tensor, structure: str) -> Curvature:
        """One batch; MC-GGN with ``num_samples`` > 1 averages independent draws."""
        result = self._accumulate_once(x, y, structure)
        if self._curvature_name != "ggn-mc" or self.num_samples == 1:
            return result
        for _ in range(self.num_samples - 1):
            more = self._accumulate_once(x, y, structure)
            for index, facs in more.factors.items():
                result.factors[index][0] = result.factors[index][0] + facs[0]
            for index, d in more.diags.items():
                result.diags[index] = result.diags[index] + d
        for facs in result.factors.values():
            facs[0] = facs[0] / self.num_samples
        for index in result.diags:
            result.diags[index] = result.diags[index] / self.num_samples
        return result

    def _scale_to_laplace(self, result: Curvature) -> None:
        """EF of the regression loss in laplace-torch's MSELoss(sum) convention (×2)."""
        if self._curvature_name == "ef" and self.likelihood == "regression":
            for facs in result.factors.values():
                facs[0] = 2.0 * facs[0]
            for index in result.diags:
                result.diags[index] = 2.0 * result.diags[index]

    def kron(
        self,
        x: torch.Tensor | MutableMapping[str, Any],
        y: torch.Tensor,
        N: int,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Kron]:
        """``(loss, Kron)`` of one batch; A factors carry 1/N (laplace-torch's scaling)."""
        self._check_call(dict(kwargs))
        if int(N) < 1:
            raise ValueError(f"N (the number of training points) must be >= 1, got {N}")
        result = self._accumulate(x, y, "kron")
        self._scale_to_laplace(result)
        ratio = result.n_data / int(N)
        kfacs: list[list[torch.Tensor]] = []
        for index, block in enumerate(result.blocks):
            if index in result.factors:
                facs = result.factors[index]
                if facs[0].ndim == 3:
                    raise ValueError(
                        f"parameter {block.name!r} has one Kronecker block per row slice (a "
                        "grouped convolution or attention's packed q/k/v), which laplace-torch's "
                        "Kron layout cannot hold; use DiagLaplace or spamkern.fit_laplace"
                    )
                kfacs.append([facs[0], facs[1] * ratio] if len(facs) == 2 else [facs[0]])
                continue
            diag = result.diags[index]
            if diag.ndim != 1:
                raise ValueError(
                    f"parameter {block.name!r} ({type(block.module).__name__}, shape "
                    f"{tuple(block.shape)}) lies outside Linear/Conv2d and has no Kronecker "
                    "form in laplace-torch's Kron layout; use DiagLaplace, freeze it "
                    "(requires_grad=False), or fit with spamkern.fit_laplace"
                )
            kfacs.append([torch.diag(diag)])
        return result.loss.detach(), Kron(kfacs)

    def diag(
        self,
        x: torch.Tensor | MutableMapping[str, Any],
        y: torch.Tensor,
        N: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, (P,) curvature diagonal)`` of one batch (a sum: no 1/N)."""
        self._check_call(dict(kwargs))
        result = self._accumulate(x, y, "diag")
        self._scale_to_laplace(result)
        flat = torch.cat([result.diags[i].reshape(-1) for i in range(len(result.blocks))])
        return result.loss.detach(), flat


class SpamkernGGN(_SpamkernCurvature, GGNInterface):
    """Exact GGN (or, with ``stochastic=True``, the one-label MC-GGN) for laplace-torch.

    ``backend_kwargs`` may set ``stochastic``, ``num_samples`` (MC draws averaged per batch)
    and ``generator`` (a ``torch.Generator`` for the MC labels; default: torch's global one).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            stochastic=stochastic,
            num_samples=int(num_samples),
        )
        self.generator = generator

    @property
    def _curvature_name(self) -> str:  # type: ignore[override]
        return "ggn-mc" if self.stochastic else "ggn"


class SpamkernGGNMC(SpamkernGGN):
    """:class:`SpamkernGGN` with ``stochastic=True`` by default (for ``marglik_training``)."""

    def __init__(self, model: nn.Module, likelihood: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stochastic", True)
        super().__init__(model, likelihood, *args, **kwargs)


class SpamkernEF(_SpamkernCurvature, EFInterface):
    """Empirical Fisher (per-sample loss gradients with the true labels) for laplace-torch."""

    _curvature_name = "ef"


# ------------------------------------------------------------------- laplace-torch → OPD
class _FixedPrior(nn.Module):
    """The prior precision diagonal of a laplace-torch fit, as spamkern's posteriors expose it."""

    def __init__(self, diag: torch.Tensor):
        super().__init__()
        self.register_buffer("diag", diag.detach().clone())

    def precision_diag(self) -> torch.Tensor:
        return self.diag


class LaplaceTorchPosterior:
    """A fitted laplace-torch posterior seen through spamkern's posterior interface."""

    def __init__(
        self,
        model: nn.Module,
        named_params: list[tuple[str, nn.Parameter]],
        mean: torch.Tensor,
        curvature_diag: torch.Tensor,
        prior_diag: torch.Tensor,
        curvature_scale: float,
        likelihood: str,
        temperature: float,
    ):
        self.model = model
        self.named_params = named_params
        self.mean = mean
        self._curvature_diag = curvature_diag
        self.prior = _FixedPrior(prior_diag)
        self.curvature_scale = curvature_scale
        self.likelihood = likelihood
        self.temperature = temperature

    def curvature_diag(self) -> torch.Tensor:
        """(P,) diag of laplace-torch's H (its GGN/EF, before ``_H_factor``)."""
        return self._curvature_diag

    def precision_diag(self) -> torch.Tensor:
        """(P,) diag Π = diag(H) · _H_factor + prior precision, as laplace-torch defines it."""
        return self._curvature_diag * self.curvature_scale + self.prior.precision_diag()


def _laplace_curvature_diag(la: BaseLaplace) -> torch.Tensor:
    if isinstance(la, KronLaplace):
        if la.H_facs is None:
            raise ValueError("the KronLaplace is not fitted; call la.fit(train_loader) first")
        return kron_curvature_diag([tuple(f) for f in la.H_facs.kfacs])
    H = getattr(la, "H", None)
    if H is None:
        raise ValueError(f"the {type(la).__name__} is not fitted; call la.fit(train_loader) first")
    return H.diagonal() if isinstance(la, FullLaplace) else H


def is_laplace_torch_posterior(obj: object) -> bool:
    """Whether ``obj`` is a laplace-torch posterior :func:`from_laplace` can read."""
    return isinstance(obj, KronLaplace | DiagLaplace | FullLaplace) and not isinstance(
        obj, LLLaplace | SubnetLaplace
    )


def from_laplace(la: BaseLaplace) -> LaplaceTorchPosterior:
    """Read a fitted all-weights ``KronLaplace``/``DiagLaplace``/``FullLaplace`` for OPD.

    The curvature diagonal comes from laplace-torch's own H (diag(G) ⊗ diag(A) per Kronecker
    block), the scale is its ``_H_factor`` = 1/(σ² T) and the prior its
    ``prior_precision_diag``; nothing is refitted.
    """
    if not is_laplace_torch_posterior(la):
        raise TypeError(
            "from_laplace reads laplace-torch KronLaplace, DiagLaplace or FullLaplace over all "
            f"weights (subset_of_weights='all'), got {type(la).__name__}"
        )
    if la.n_data == 0:
        raise ValueError(f"the {type(la).__name__} is not fitted; call la.fit(train_loader) first")
    named = [(n, p) for n, p in la.model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for _, p in named)
    h = _laplace_curvature_diag(la).detach()
    if h.numel() != n_params or la.mean.numel() != n_params:
        raise ValueError(
            f"the laplace-torch posterior covers {la.mean.numel()} parameters but the model has "
            f"{n_params} trainable ones; from_laplace needs subset_of_weights='all'"
        )
    mean = la.mean.detach()
    return LaplaceTorchPosterior(
        model=la.model,
        named_params=named,
        mean=mean,
        curvature_diag=h.to(mean.dtype),
        prior_diag=la.prior_precision_diag.detach().to(mean.dtype).expand(n_params),
        curvature_scale=float(la._H_factor),
        likelihood=_likelihood_name(la.likelihood),
        temperature=float(la.temperature),
    )


def _laplace_covariance_diag(la: BaseLaplace) -> torch.Tensor:
    """(P,) diag Π⁻¹ of a fitted laplace-torch posterior (for the OBS saliency)."""
    if isinstance(la, KronLaplace):
        return la.posterior_precision.diag(exponent=-1).detach()
    if isinstance(la, FullLaplace):
        return la.posterior_covariance.diagonal().detach()
    return la.posterior_variance.detach()


def _opd_terms(la: BaseLaplace):
    from spamkern.pruning.scores import PosteriorTerms

    post = from_laplace(la)
    kron = None
    if isinstance(la, KronLaplace):  # laplace-torch's layout: [G, A] per weight, [G] otherwise
        kron = [tuple(f) if len(f) == 2 else (f[0],) for f in la.H_facs.kfacs]
    return PosteriorTerms(
        named_params=post.named_params,
        mean=post.mean,
        curvature_diag=post.curvature_diag(),
        prior_diag=post.prior.precision_diag(),
        curvature_scale=post.curvature_scale,
        covariance_diag=lambda: _laplace_covariance_diag(la).to(post.mean.dtype),
        kron_factors=kron,
    )


def _register_opd_adapter() -> None:
    from spamkern.pruning.scores import register_posterior_adapter

    register_posterior_adapter(is_laplace_torch_posterior, _opd_terms)


_register_opd_adapter()
