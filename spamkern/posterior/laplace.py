"""The Laplace posterior: curvature + prior at θ*, and the evidence that trains the prior.

    log p(D | δ) ≈ −s·L(θ*) − c_σ − ½ θ*ᵀ diag(δ) θ* − ½ log det Π + ½ Σ_i log δ_i,
    Π = s·H + diag(δ),   s = 1/T (classification) or 1/(T σ²) (regression),

with c_σ = N·C·log(σ√(2π)) for the Gaussian likelihood (laplace-torch's convention, so
values compare one to one). Everything is differentiable w.r.t. the prior's log
precisions and log σ.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from spamkern.curvature.accumulate import Curvature
from spamkern.ops.logdet import EigLogdetPlan
from spamkern.ops.parameterwise import parameterwise_gradient
from spamkern.ops.precision import kron_precision_and_opd
from spamkern.ops.reductions import all_finite, float64_sum
from spamkern.posterior.block_shift import ShiftPolicy
from spamkern.posterior.blocks import (
    BlockEigen,
    CurvatureBlock,
    StackedEigen,
    curvature_blocks,
    decompose_kron_blocks,
    unitwise_logdet,
    weight_matrix_shape,
)
from spamkern.posterior.projected import CouplingMatrix
from spamkern.posterior.unitwise_terms import (
    scatter_squares,
    unitwise_log_det_ratio,
    unitwise_scatter,
)
from spamkern.prior.priors import Prior, TensorPrecision
from spamkern.validation import check_positive_finite

COUPLINGS = ("none", "cheap", "all")


class ClosedFormEvidence(NamedTuple):
    """:meth:`LaplacePosterior.closed_form_evidence_and_gradient`'s result, in the prior's
    flat hyperparameter layout."""

    value: torch.Tensor  # the log evidence (0-d)
    grad: torch.Tensor  # ∂E/∂log δ
    scatter: torch.Tensor  # Σ_{i∈g} δ_i θ_i² per hyperparameter g
    # parameterwise: −∂²E/∂t² along shifts of log δ, per tensor (see ShiftCurvature)
    shift_curvature: list[ShiftCurvature] | None = None
    # scalar and layerwise: −∂²E/∂(log δ)², exact (each tensor's δ enters its own terms only)
    curvature: torch.Tensor | None = None


class ShiftCurvature(NamedTuple):
    """−∂²E/∂t² for one shift t of log δ over a whole tensor, over each row of its (p, q)
    weight matrix and over each column (None where not computed). A shift of entries that
    share the projected δ̃ loses the part of their own curvature Σ ½δ_i(θ_i² + Σ_ii) that
    the coupling cancels: Σ_ab (∂δ̃_ab/∂t)²/(2 c_ab²)."""

    tensor: torch.Tensor  # 0-d
    rows: torch.Tensor | None  # (p,)
    cols: torch.Tensor | None  # (q,)
    # for at most one side: −∂²E/∂t_r∂t_s between different rows' (columns') shifts is
    # −½ coupling.dense() (approximate for weights, exact for biases: see
    # spamkern.posterior.projected); its diagonal is ``rows`` (``cols``), not the matrix's
    coupling: CouplingMatrix | None = None
    # the entries' own curvature ½δ_i(θ_i² + Σ_ii) = ½ − ∂E/∂log δ_i, shaped (p, q)
    own: torch.Tensor | None = None
    # ``own`` summed over each row (p,) and each column (q,)
    own_sums: tuple[torch.Tensor, torch.Tensor] | None = None


class BlockShare(NamedTuple):
    """One block's share of a parameterwise evidence (see
    :meth:`LaplacePosterior.parameterwise_shares`)."""

    value: torch.Tensor  # −½ (log det_b − Σ log δ_b + Σ δ_b θ_b²), float64 (0-d)
    grad: torch.Tensor  # ∂E/∂log δ over the block's slot (flat)
    scatter: torch.Tensor  # δ_i θ_i² per entry of the slot
    curvature: ShiftCurvature | None  # when couplings were asked for
    shift: float = 0.0  # the constant the block's log δ was shifted by (see parameterwise_shares)


class LaplacePosterior:
    """Posterior of a fitted model; ``structure`` is "kron" or "diag"."""

    def __init__(
        self,
        model: nn.Module,
        curvature: Curvature,
        prior: Prior,
        likelihood: str,
        structure: str,
        curvature_type: str,
        temperature: float,
        sigma_noise: float | torch.Tensor = 1.0,
    ):
        self.model = model
        self.curvature = curvature
        self.prior = prior
        self.likelihood = likelihood
        self.structure = structure
        self.curvature_type = curvature_type
        self.temperature = float(temperature)
        self.blocks = curvature.blocks
        self.named_params = [(b.name, b.param) for b in self.blocks]
        self.mean = torch.cat([b.param.detach().reshape(-1) for b in self.blocks])
        sigma = torch.as_tensor(sigma_noise, dtype=self.mean.dtype, device=self.mean.device)
        if sigma.ndim != 0 or not (bool(sigma > 0) and bool(torch.isfinite(sigma))):
            raise ValueError(f"sigma_noise must be one finite number > 0, got {sigma_noise}")
        if likelihood != "regression" and float(sigma) != 1.0:
            raise ValueError("sigma_noise applies to regression only")
        self.log_sigma = sigma.log().detach().clone()
        # one typed block per tensor: exact diagonal, Kronecker, or row-sliced Kronecker
        self.curvature_blocks: list[CurvatureBlock] = curvature_blocks(
            curvature.block_factors(), [b.name for b in self.blocks], [b.shape for b in self.blocks]
        )
        self._plan: EigLogdetPlan | None = None
        self._scalar_terms: tuple | None = None  # see _scalar_plan_terms
        self._mean_squares: tuple[int, torch.Tensor] | None = None  # see _squared_mean
        self._unit_squares: tuple[int, list] | None = None  # unitwise θ², see scatter_squares
        self._sides: dict[str, tuple[list, list]] = {}  # see _parameterwise_sides

    # -- sizes and simple quantities ------------------------------------------------------
    @property
    def n_data(self) -> int:
        return self.curvature.n_data

    @property
    def n_params(self) -> int:
        return self.mean.numel()

    @property
    def sigma_noise(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def _scale(self, log_sigma: torch.Tensor | None = None) -> torch.Tensor:
        ls = self.log_sigma if log_sigma is None else log_sigma
        if self.likelihood == "regression":
            return torch.exp(-2.0 * ls) / self.temperature
        return torch.ones((), dtype=self.mean.dtype, device=self.mean.device) / self.temperature

    @property
    def curvature_scale(self) -> float:
        """s in Π = s·H + δ: 1/T, or 1/(T σ²) for regression."""
        return float(self._scale())

    @property
    def kron_factors(self) -> list:
        """Per parameter tensor: ``(G, A)`` for a weight, ``(G,)`` for a bias, or the exact
        diagonal (a tensor shaped like the parameter) for any other tensor.

        Row-sliced blocks — grouped/depthwise convolutions and attention's packed
        ``in_proj_weight``/``in_proj_bias`` — return stacked factors, one slice per leading
        index: ``(G, A)`` with G (slices, rows/slices, rows/slices) and A (slices, d, d) for
        the weight, ``(G,)`` for the bias; slice j covers rows j·rows/slices onwards.
        """
        if self.structure != "kron":
            raise AttributeError("kron_factors exists for structure='kron' only")
        return [block.public_factors() for block in self.curvature_blocks]

    def curvature_diag(self) -> torch.Tensor:
        """(P,) diagonal of the GGN/EF approximation (no temperature, no 1/σ²)."""
        return torch.cat([block.curvature_diag() for block in self.curvature_blocks])

    def precision_diag(self) -> torch.Tensor:
        """(P,) diag Π = s·diag(H) + δ, exact for every prior."""
        return self.precision_and_opd()[0]

    def precision_and_opd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag Π, OPD scores ½ θ² diag Π)`` in one pass over the factor diagonals.

        diag(G ⊗ A) = diag(G) ⊗ diag(A) is never formed as a separate (P,) vector: the
        fused backends read the factor diagonals, θ and δ and write both outputs.
        """
        _check_finite_hyper(self.prior.log_precision)
        pairs = [pair for block in self.curvature_blocks for pair in block.factor_diagonals()]
        diag_g = [g for g, _ in pairs]
        diag_a = [a for _, a in pairs]
        prior_diag = self.prior.precision_diag().detach()
        return kron_precision_and_opd(self.mean, diag_g, diag_a, prior_diag, self.curvature_scale)

    # -- evidence ----------------------------------------------------------------------------
    def log_likelihood(self, log_sigma: torch.Tensor | None = None) -> torch.Tensor:
        value = -self._scale(log_sigma) * self.curvature.loss
        if self.likelihood == "regression":
            ls = self.log_sigma if log_sigma is None else log_sigma
            value = value - self.n_data * self.curvature.n_outputs * (
                ls + 0.5 * math.log(2 * math.pi)
            )
        return value

    def _decompose(self, indices, vectors: bool = True) -> None:
        """Eigendecompose the Kronecker factors of these blocks (once per fit, batched);
        eigenvalues only unless ``vectors``."""
        decompose_kron_blocks([self.curvature_blocks[i] for i in indices], vectors)

    def _uses_plan(self, index: int) -> bool:
        """Blocks whose log det goes through the packed eigenvalue plan (fixed eigenbasis)."""
        return self.curvature_blocks[index].uses_plan(self.prior.kind)

    def _logdet_plan(self) -> EigLogdetPlan:
        if self._plan is None:
            planned = [i for i in range(len(self.curvature_blocks)) if self._uses_plan(i)]
            self._decompose(planned, vectors=False)
            pairs = [
                pair
                for index in planned
                for pair in self.curvature_blocks[index].plan_eigenvalues()
            ]
            self._plan = EigLogdetPlan([a for a, _ in pairs], [b for _, b in pairs])
        return self._plan

    def _plan_deltas(self, index: int, tp: TensorPrecision) -> list[torch.Tensor]:
        self._decompose([index], vectors=tp.kind != "scalar")  # δ̃ projects onto the basis
        return self.curvature_blocks[index].plan_deltas(tp)

    def log_det_posterior_precision(
        self, log_precision: torch.Tensor | None = None, log_sigma: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log det Π (exact for scalar/layerwise/unitwise/diag, the upper bound of
        :mod:`spamkern.posterior.blocks` for parameterwise Kronecker blocks)."""
        return self._log_det_float64(log_precision, log_sigma).to(self.mean.dtype)

    def _log_det_float64(
        self, log_precision: torch.Tensor | None, log_sigma: torch.Tensor | None
    ) -> torch.Tensor:
        """log det Π as a float64 0-d tensor (unitwise blocks summed in float64)."""
        scale = self._scale(log_sigma)
        tps = self.prior.per_tensor(log_precision)
        deltas, unit_blocks = [], []
        for index, tp in enumerate(tps):
            if self._uses_plan(index):
                deltas.extend(self._plan_deltas(index, tp))
            else:
                unit_blocks.extend(self.curvature_blocks[index].unitwise_parts(tp))
        total = unitwise_logdet(unit_blocks, scale) if unit_blocks else None
        plan_value = self._logdet_plan()(deltas, scale) if deltas else None
        parts = [t.to(torch.float64) for t in (plan_value, total) if t is not None]
        return sum(parts[1:], parts[0])

    def log_marginal_likelihood(
        self,
        prior_precision=None,
        sigma_noise: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Laplace log evidence (0-d), differentiable w.r.t. the prior and σ.

        ``prior_precision`` (optional) evaluates it at other precisions — any shape
        :meth:`Prior.to_log_precision` accepts, differentiable if it requires grad; by default
        the prior's own ``log_precision`` parameter is used (so ``.backward()`` reaches it).
        Nothing is overwritten. Optimisers that work in log space call :meth:`log_evidence`.
        """
        lp = None if prior_precision is None else self.prior.to_log_precision(prior_precision)
        log_sigma = None
        if sigma_noise is not None:
            if self.likelihood != "regression":
                raise ValueError("sigma_noise can only be given for regression")
            check_positive_finite("sigma_noise", sigma_noise)
            log_sigma = torch.as_tensor(sigma_noise, dtype=self.mean.dtype).log()
        return self.log_evidence(lp, log_sigma)

    def log_evidence(
        self, log_precision: torch.Tensor | None = None, log_sigma: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Laplace log evidence (0-d) at log precisions in the prior's own flat layout.

        The cheap path for hyperparameter optimisers: no conversion or positivity check of
        user precisions, differentiable w.r.t. both arguments, and neither the prior nor the
        posterior's σ is touched. ``log_precision`` defaults to the prior's parameter,
        ``log_sigma`` (regression only) to the posterior's own log σ.
        """
        lp = self.prior.log_precision if log_precision is None else log_precision
        _check_hyper_shape(lp, self.prior)
        if log_sigma is not None and self.likelihood != "regression":
            raise ValueError("log_sigma can only be given for regression")
        _check_finite_hyper(lp)
        log_delta = self.prior.log_precision_diag(lp)
        scatter = float64_sum(log_delta.exp() * self._squared_mean())
        log_det_ratio = self._log_det_float64(lp, log_sigma) - float64_sum(log_delta)
        return self._evidence(log_det_ratio, scatter, log_sigma)

    @torch.no_grad()
    def closed_form_evidence_and_gradient(
        self, log_precision: torch.Tensor, couplings: str = "none"
    ) -> ClosedFormEvidence:
        """The log evidence, its gradient w.r.t. ``log_precision`` and the prior's scatter
        Σ_{i∈g} δ_i θ_i² per hyperparameter, in closed form at the posterior's σ, for every
        prior (unitwise: :mod:`spamkern.posterior.unitwise_terms`). For one δ per tensor,
        with c = s·λ1λ2ᵀ + δ_t over tensor t's eigenvalue products,

            ∂E/∂log δ_t = −½ (δ_t Σ 1/c − n_t + δ_t ‖θ_t‖²),
            −∂²E/∂(log δ_t)² = ½ (δ_t ‖θ_t‖² + δ_t Σ s·λ1λ2/c²),

        one pass over the products per evaluation instead of autograd's forward and
        backward — what the fixed-point hyperparameter update calls. ``couplings``
        ("none", "cheap", "all"; parameterwise only) adds the curvature along shifts of log δ
        over tensors, rows and columns (:class:`ShiftCurvature`), "cheap" the rows and
        columns whose products cost at most a sixteenth of the evaluation."""
        if couplings not in COUPLINGS:
            raise ValueError(f"couplings must be one of {COUPLINGS}, got {couplings!r}")
        if self.prior.kind == "parameterwise":
            return self._parameterwise_evidence_and_gradient(log_precision, couplings)
        if self.prior.kind == "unitwise":
            return self._unitwise_evidence_and_gradient(log_precision)
        _check_finite_hyper(log_precision)
        log_delta = torch.stack([tp.log_delta for tp in self.prior.per_tensor(log_precision)])
        delta = log_delta.exp()
        products, counts, squares = self._scalar_plan_terms()
        logdet, inverse, data_share = zip(*map(_uniform_terms, products, delta))
        logdet_total = torch.stack(logdet).sum() - (counts * log_delta).sum(dtype=torch.float64)
        value = self._evidence(logdet_total, (delta * squares).sum(dtype=torch.float64))
        scatter = delta * squares
        per_tensor = -0.5 * (delta * torch.stack(inverse) - counts + scatter)
        per_tensor_curvature = 0.5 * (scatter + delta * torch.stack(data_share))
        grad, scatter_g = torch.zeros_like(log_precision), torch.zeros_like(log_precision)
        curvature = torch.zeros_like(log_precision)
        for slot, g, sc, h in zip(self.prior.slots, per_tensor, scatter, per_tensor_curvature):
            grad[slot.start] += g
            scatter_g[slot.start] += sc
            curvature[slot.start] += h
        return ClosedFormEvidence(value, grad, scatter_g, curvature=curvature)

    def _parameterwise_evidence_and_gradient(
        self, log_precision: torch.Tensor, couplings: str
    ) -> ClosedFormEvidence:
        """Parameterwise: the log likelihood plus every block's share (see
        :meth:`parameterwise_shares`)."""
        shares = self.parameterwise_shares(
            log_precision, range(len(self.curvature_blocks)), couplings
        )
        value = self.evidence_from_shares([share.value for share in shares])
        grad = torch.cat([share.grad for share in shares])
        scatter = torch.cat([share.scatter for share in shares])
        curvature = None if couplings == "none" else [share.curvature for share in shares]
        return ClosedFormEvidence(value, grad, scatter, curvature)

    @torch.no_grad()
    def parameterwise_shares(
        self,
        log_precision: torch.Tensor,
        indices,
        couplings: str = "none",
        shift: ShiftPolicy | None = None,
    ) -> list[BlockShare]:
        """Parameterwise: the evidence's share of each block in ``indices`` at the flat
        ``log_precision`` (only those blocks' entries are read).

        Each block's δ enters only its own terms — the log det of its projected precision,
        its Σ log δ and its scatter — so the evidence is the log likelihood plus one share
        per block, and a block's shares, gradient and curvatures can be evaluated alone. The
        gradient ∂E/∂log δ_i = −½ (δ_i Σ_ii − 1 + δ_i θ_i²) takes Σ_ii, the diagonal of the
        block's inverse in its eigenbasis (exactly ∂ log det/∂δ_i of the projected δ̃): one
        projection and its adjoint per block and evaluation. ``couplings`` as in
        :meth:`closed_form_evidence_and_gradient`, its "cheap" choice made over all blocks.
        With a ``shift`` policy each block is first moved by its best constant shift of log δ
        (:mod:`spamkern.posterior.block_shift`), and its share is that of the shifted point:
        ``log_precision[span] + share.shift``."""
        if self.prior.kind != "parameterwise":
            raise ValueError(
                f"parameterwise_shares needs a parameterwise prior, not {self.prior.kind!r}"
            )
        if couplings not in COUPLINGS:
            raise ValueError(f"couplings must be one of {COUPLINGS}, got {couplings!r}")
        indices = _block_indices(indices, len(self.curvature_blocks))
        _check_hyper_shape(log_precision, self.prior)
        _check_finite_hyper(log_precision)
        scale = self._scale()
        self._logdet_plan()  # eigenvalues of every block (batched)
        blocks, squares = self.curvature_blocks, self._squared_mean()
        sides, matrices = self._parameterwise_sides(couplings)
        shares = []
        for index in indices:
            slot = self.prior.slots[index]
            span, shape = slice(slot.start, slot.stop), weight_matrix_shape(slot.shape)
            lp = log_precision[span]
            delta = lp.exp()
            target = None
            if shift is not None:
                target = shift.target(span, lp, float(torch.dot(delta, squares[span])))
            terms = blocks[index].parameterwise_terms(
                delta.view(shape), scale, *sides[index], matrices[index], target
            )
            # −½ (δ Σ_ii − 1 + δθ²) = ½ − own, own = ½ δ (Σ_ii + θ²) (the entries' curvature)
            own, grad, scatter, own_rows, own_cols, sums = parameterwise_gradient(
                terms.inverse.reshape(-1), squares[span], delta, lp, math.exp(terms.shift), shape[0]
            )
            log_delta_sum = sums[1] + lp.numel() * terms.shift
            value = -0.5 * (terms.logdet - log_delta_sum + sums[0])
            curvature = None
            if couplings != "none":
                curvature = _shift_curvature(own.view(shape), own_rows, own_cols, terms)
            shares.append(BlockShare(value, grad, scatter, curvature, terms.shift))
        return shares

    def _parameterwise_sides(self, couplings: str) -> tuple[list, list]:
        """Per block, the (rows, cols) couplings and the coupling matrix's side that a
        parameterwise evaluation with ``couplings`` computes: fixed by the blocks' sizes,
        so chosen once per posterior."""
        if couplings not in self._sides:
            blocks = self.curvature_blocks
            matrices = _matrix_sides(blocks) if couplings != "none" else [None] * len(blocks)
            self._sides[couplings] = (_coupling_sides(blocks, couplings), matrices)
        return self._sides[couplings]

    def evidence_from_shares(self, shares: list[torch.Tensor]) -> torch.Tensor:
        """The log evidence from every block's share (float64 sums), in the model's dtype."""
        loglik = self.log_likelihood()
        return (loglik.to(torch.float64) + torch.stack(shares).sum()).to(loglik.dtype)

    def _unitwise_evidence_and_gradient(self, log_precision: torch.Tensor) -> ClosedFormEvidence:
        """Unitwise: the log det ratio and its gradient from the whitened decompositions
        (:mod:`spamkern.posterior.unitwise_terms`), the scatter as bilinear forms."""
        _check_finite_hyper(log_precision)
        ratio = unitwise_log_det_ratio(
            self.curvature_blocks, self.prior, log_precision, self._scale()
        )
        if self._unit_squares is None or self._unit_squares[0] != self.mean._version:
            self._unit_squares = (self.mean._version, scatter_squares(self.prior, self.mean))
        total, scatter = unitwise_scatter(self.prior, log_precision, self._unit_squares[1])
        value = self._evidence(ratio.value, total)
        return ClosedFormEvidence(value, -0.5 * (ratio.grad + scatter), scatter)

    def _squared_mean(self) -> torch.Tensor:
        """θ² per entry, kept while the mean is not modified in place (every parameterwise
        evaluation needs it)."""
        cached = self._mean_squares
        if cached is None or cached[0] != self.mean._version:
            self._mean_squares = cached = (self.mean._version, self.mean.square())
        return cached[1]

    def _evidence(
        self, log_det_ratio: torch.Tensor, scatter: torch.Tensor, log_sigma=None
    ) -> torch.Tensor:
        """log p(D|θ) − ½ (log det ratio + Σ δθ²), from float64 sums: the log det of the
        posterior and of the prior are each ~P·log δ and cancel to a far smaller number,
        which float32 sums over ~10⁵ entries would only know to ~0.1 nats."""
        loglik = self.log_likelihood(log_sigma)
        value = loglik.to(torch.float64) - 0.5 * (log_det_ratio + scatter)
        return value.to(loglik.dtype)

    def _scalar_plan_terms(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per tensor: s·λ1 ⊗ λ2 (flat), the entry count and ‖θ_t‖² (cached per posterior
        and σ: the eigenvalues and θ are fixed while the hyperparameters move)."""
        scale = self._scale()
        cached = self._scalar_terms
        if cached is not None and torch.equal(cached[0], scale):
            return cached[1]
        self._logdet_plan()  # eigenvalues of every block (batched)
        products = []
        for block in self.curvature_blocks:
            ((l1, l2),) = block.plan_eigenvalues()
            products.append((scale * torch.outer(l1, l2)).reshape(-1))
        dtype, device = self.mean.dtype, self.mean.device
        counts = torch.tensor([b.numel for b in self.blocks], dtype=dtype, device=device)
        squares = torch.stack(
            [self.mean[b.offset : b.offset + b.numel].square().sum() for b in self.blocks]
        )
        self._scalar_terms = (scale, (products, counts, squares))
        return self._scalar_terms[1]

    # -- predictive --------------------------------------------------------------------------
    def _block_eigen(self, index: int, tp: TensorPrecision, scale) -> BlockEigen | StackedEigen:
        block = self.curvature_blocks[index]
        unitwise = self.prior.kind == "unitwise"
        if not unitwise:
            self._decompose([index])
        return block.eigen(tp, scale, unitwise)

    @torch.no_grad()
    def covariance_diag(self, log_precision: torch.Tensor | None = None) -> torch.Tensor:
        """(P,) diagonal of the posterior covariance Π⁻¹ in ``parameters()`` order.

        From each block's eigenbasis (no new decomposition for scalar/layerwise/parameterwise
        priors; unitwise decomposes its whitened factors). Exact for diag, scalar, layerwise
        and unitwise posteriors; for parameterwise Kronecker blocks it uses the same
        eigenbasis-diagonal approximation as the log det. Used by the OBS saliency
        (½ θ² / Σ_ii) and by the fixed-point hyperparameter updates (γ = 1 − δ Σ_ii).
        """
        lp = self.prior.log_precision if log_precision is None else log_precision
        _check_finite_hyper(lp)
        scale = self._scale()
        parts = [
            self._block_eigen(index, tp, scale).inverse_diag().reshape(-1)
            for index, tp in enumerate(self.prior.per_tensor(lp))
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def functional_variance(self, J: torch.Tensor) -> torch.Tensor:
        """(B, C, C) J Σ Jᵀ for the (B, C, P) Jacobian J of the outputs w.r.t. θ.

        Exact for diag, scalar/layerwise and unitwise posteriors; for parameterwise Kronecker
        blocks Σ uses the same eigenbasis-diagonal approximation as the log det.
        """
        if J.ndim != 3 or J.shape[-1] != self.n_params:
            raise ValueError(f"J must be (batch, outputs, {self.n_params}), got {tuple(J.shape)}")
        scale = self._scale()
        out = J.new_zeros(J.shape[0], J.shape[1], J.shape[1])
        for index, tp in enumerate(self.prior.per_tensor()):
            block = self.blocks[index]
            p, q = weight_matrix_shape(block.shape)
            Jb = J[..., block.offset : block.offset + block.numel].reshape(
                J.shape[0], J.shape[1], p, q
            )
            out += self._block_eigen(index, tp, scale).quadratic(Jb)
        return out


def _block_indices(indices, n_blocks: int) -> list[int]:
    """``indices`` as a list of distinct block indices in [0, n_blocks), or a clear error."""
    out = list(indices)
    bad = [i for i in out if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_blocks]
    if bad or len(set(out)) != len(out):
        raise ValueError(
            f"block indices must be distinct integers in [0, {n_blocks}) — one per curvature "
            f"block of the posterior; got {out}"
        )
    return out


def _uniform_terms(product: torch.Tensor, delta: torch.Tensor) -> tuple:
    """Σ log c (float64), Σ 1/c and Σ product/c² for c = product + δ: what one δ over a
    block's eigenvalue products s·λ1λ2 contributes to the log det and its derivatives."""
    c = product + delta
    reciprocal = c.reciprocal()
    return float64_sum(c.log_()), reciprocal.sum(), torch.dot(product * reciprocal, reciprocal)


def _shift_curvature(own: torch.Tensor, own_rows, own_cols, terms) -> ShiftCurvature:
    """One tensor's, from its entries' own curvature ½δ(θ² + Σ_ii) (a (p, q) matrix, with
    its row and column sums) and its block's couplings."""
    rows = None if terms.row_coupling is None else own_rows - 0.5 * terms.row_coupling
    cols = None if terms.col_coupling is None else own_cols - 0.5 * terms.col_coupling
    tensor = own_rows.sum() - 0.5 * terms.shift_coupling
    return ShiftCurvature(tensor, rows, cols, terms.coupling_matrix, own, (own_rows, own_cols))


def _coupling_sides(blocks: list, couplings: str) -> list[tuple[bool, bool]]:
    """(rows, cols) per block: none, all, or — for "cheap" — those whose products cost at
    most 1/16 of the whole evaluation (an MLP's 784-input first layer skips both sides:
    measured, taking its rows from the cancelled fraction too costs no evaluations and
    saves a tenth of each; skipping the other blocks' couplings as well costs a fifth
    more evaluations)."""
    if couplings != "cheap":
        return [(couplings == "all", couplings == "all")] * len(blocks)
    costs = [block.side_costs() for block in blocks]
    budget = sum(c[0] for c in costs) / 16
    return [(rows <= budget, cols <= budget) for _, rows, cols in costs]


def _matrix_sides(blocks: list) -> list[str | None]:
    """Per block, the side ("rows", "cols" or None) whose shifts get a coupling matrix: the
    larger of those whose matrix — built and factorised in ~m³ multiply-adds for m rows or
    columns — costs at most 1/16 of the evaluation (rows on a tie).

    Measured on an MLP 784-256-256-10 in 4-epoch SpaM training: the per-row (column)
    curvature alone left the iteration 13 (12) slow directions in the 256 row shifts of
    the second layer (column shifts of the third) and in the biases; one matrix per block
    took 42 evaluations to 27. The smaller side instead took 37; both sides added
    together 33, as both at once overstep along their shared directions; both solved as
    one (p + q) system 27, for a 512 × 512 factorisation (~3 ms) per evaluation."""
    budget = sum(block.side_costs()[0] for block in blocks) / 16
    out = []
    for block in blocks:
        rows, cols = (m if m > 1 and m**3 <= budget else 0 for m in block.shift_sides())
        out.append(None if not (rows or cols) else ("rows" if rows >= cols else "cols"))
    return out


def _check_hyper_shape(log_precision: torch.Tensor, prior: Prior) -> None:
    """``log_precision`` must be laid out like the prior's flat hyperparameter vector."""
    if log_precision.shape != prior.log_precision.shape:
        raise ValueError(
            f"log_precision must have the prior's shape {tuple(prior.log_precision.shape)}"
            f" (its flat hyperparameter vector), got {tuple(log_precision.shape)}"
        )


def _check_finite_hyper(log_precision: torch.Tensor) -> None:
    """NaN/Inf hyperparameters are an error, not a silent NaN evidence."""
    if not all_finite(log_precision):
        raise ValueError(
            "the prior's log precisions contain NaN or Inf (diverged hyperparameter "
            "optimisation?); lower lr_hyp or reset them with prior.set_precision(...)"
        )
