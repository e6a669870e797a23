"""Per-tensor posterior precision in an eigenbasis: log det and inverse, for every prior.

A block's precision Π = s·H + D (s = 1/T or 1/(Tσ²)) is written as

    Π ≈ W⁻¹ Q diag(denom) Qᵀ W⁻¹,   Q = Q1 ⊗ Q2,   W = diag(w)

so log det Π = Σ log denom − 2 Σ log w and Π⁻¹ = W Q diag(1/denom) Qᵀ W. The cases:

* exact diagonal block (any prior): Q = I, denom = s·h + δ, w = 1 (exact);
* Kronecker block, scalar/layerwise δ: denom = s·λ1 λ2ᵀ + δ (exact);
* Kronecker block, unitwise D = diag(e^a) ⊗ diag(e^b): whiten G̃ = D_a^{-½} G D_a^{-½},
  Ã = D_b^{-½} A D_b^{-½}; denom = s·λ̃1 λ̃2ᵀ + 1, w = e^{-(a_m+b_n)/2} (exact);
* Kronecker block, parameterwise D: δ̃ = (Q1∘Q1)ᵀ D (Q2∘Q2), denom = s·λ1 λ2ᵀ + δ̃. This
  keeps only the diagonal of QᵀDQ, so its log det is an upper bound on the exact one
  (Hadamard's inequality for the positive definite QᵀΠQ) and its inverse an approximation.

A bias block has the single factor G: the same with λ2 ≡ 1, Q2 = [1].

Each parameter tensor's curvature is one typed block with the operations the posterior
needs (curvature and factor diagonals, log det plan entries, eigenbasis, unitwise parts):
:class:`DiagBlock` (exact diagonal), :class:`KronBlock` (``[G, A]`` or ``[G]``) and
:class:`RowSlicedKronBlock` — block-diagonal over equal row slices, each slice its own
Kronecker block (grouped convolutions, attention's packed q/k/v), exact slice by slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spamkern.ops.parameterwise import projected_precision
from spamkern.ops.reductions import float64_sum
from spamkern.posterior.block_shift import ShiftTarget, best_shift
from spamkern.posterior.eigen import batched_eigh, is_kept
from spamkern.posterior.projected import (
    ProjectedTerms,
    SquaredBasis,
    projected_terms,
    side_costs,
)
from spamkern.prior.priors import TensorPrecision


@dataclass
class BlockEigen:
    """One tensor's precision in its eigenbasis (see module docstring)."""

    q1: torch.Tensor | None  # (p, p) or None for the identity
    q2: torch.Tensor | None  # (q, q) or None for the identity / a bias block
    denom: torch.Tensor  # (p, q)
    log_w: torch.Tensor | None  # (p, q) broadcastable, or None for w = 1

    def logdet(self) -> torch.Tensor:
        total = self.denom.log().sum()
        if self.log_w is not None:
            total = total - 2.0 * self.log_w.expand_as(self.denom).sum()
        return total

    def inverse_diag(self) -> torch.Tensor:
        """(p, q) diagonal of Π⁻¹ = W Q diag(1/denom) Qᵀ W: (Q1∘Q1)(1/denom)(Q2∘Q2)ᵀ ∘ w²."""
        out = self.denom.reciprocal()
        if self.q1 is not None:
            out = self.q1.square() @ out
        if self.q2 is not None:
            out = out @ self.q2.square().mT  # .mT: also for stacked slices
        if self.log_w is not None:
            out = out * (2.0 * self.log_w).exp()
        return out

    def quadratic(self, J: torch.Tensor) -> torch.Tensor:
        """(B, C, C) J Π⁻¹ Jᵀ for J of shape (B, C, p, q) (this block's Jacobian)."""
        one = [None if t is None else t.unsqueeze(0) for t in (self.q1, self.q2, self.log_w)]
        return _sliced_quadratic(J.unsqueeze(2), one[0], one[1], self.denom.unsqueeze(0), one[2])


def _sliced_quadratic(J, q1, q2, denom, log_w) -> torch.Tensor:
    """Σ over slices g of J_g Π_g⁻¹ J_gᵀ for J (B, C, g, p, q): Π_g⁻¹ = W Q diag(1/denom) Qᵀ W
    with a leading slice dimension on q1 (g, p, p), q2 (g, q, q), denom and log_w."""
    if log_w is not None:
        J = J * log_w.exp()
    if q1 is not None:
        J = torch.einsum("gmp,bcgmq->bcgpq", q1, J)
    if q2 is not None:
        J = torch.einsum("bcgpn,gnq->bcgpq", J, q2)
    return torch.einsum("bcgpq,bdgpq->bcd", J / denom, J)


def weight_matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(out, in·kh·kw) view of a weight, (out, 1) of a bias or other tensor."""
    if len(shape) >= 2:
        return shape[0], int(torch.Size(shape[1:]).numel())
    return (int(torch.Size(shape).numel()), 1)


def unit_log_grid(tp: TensorPrecision, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log precisions of a unitwise weight, columns repeated over kernel
    positions (b_rep in docs/maths.md)."""
    positions = int(torch.Size(shape[2:]).numel()) if len(shape) > 2 else 1
    return tp.a, tp.b.repeat_interleave(positions)


class WhitenedEigenCache:
    """The last eigendecomposition of each whitened factor of one Kronecker block, with the
    log precisions it was whitened by.

    A hyperparameter update that moves only the rows a (or only the columns b) changes
    G̃ (or Ã) alone: the other factor's decomposition is reused bit for bit, so evidence and
    gradient equal those of a fresh decomposition exactly. Keyed by exact equality of the
    whitening vector, so any change at all decomposes anew."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, WhitenedDecomposition] | None] = [None, None]
        self.n_decompositions = [0, 0]  # per factor: how often it was decomposed

    def lookup(self, slot: int, log_w: torch.Tensor) -> WhitenedDecomposition | None:
        entry = self.entries[slot]
        if entry is None or entry[0].dtype != log_w.dtype or not torch.equal(entry[0], log_w):
            return None
        return entry[1]

    def store(self, slot: int, log_w: torch.Tensor, decomposition: WhitenedDecomposition) -> None:
        self.entries[slot] = (log_w.detach().clone(), decomposition)
        self.n_decompositions[slot] += 1


class WhitenedDecomposition:
    """One whitened factor's eigendecomposition, with Q∘Q — what the first-order gradient
    of its eigenvalues needs at every evaluation that reuses it — computed once."""

    def __init__(self, values: torch.Tensor, vectors: torch.Tensor):
        self.values, self.vectors = values, vectors
        self._squared: torch.Tensor | None = None

    @property
    def squared(self) -> torch.Tensor:
        if self._squared is None:
            self._squared = self.vectors.square()
        return self._squared


_WHITENED = "_spamkern_whitened"


def _kept_whitened(F: torch.Tensor, u: torch.Tensor):
    """The last whitened decomposition of a factor that outlives one fit (the data-only
    input factor of a first layer, :func:`keep_eigh`), if it was for this whitening ``u``:
    the next marglik step starts where the previous one ended, so its first evaluation
    reuses the previous step's last decomposition of that (largest) factor."""
    memo = getattr(F, _WHITENED, None)
    if memo is None or memo[0] != F._version or memo[1].dtype != u.dtype:
        return None
    return memo[2] if torch.equal(memo[1], u) else None


def _keep_whitened(F: torch.Tensor, u: torch.Tensor, decomposition: WhitenedDecomposition) -> None:
    if is_kept(F):
        setattr(F, _WHITENED, (F._version, u.detach().clone(), decomposition))


def whitening_vectors(factors, tp: TensorPrecision, shape: torch.Size) -> list[torch.Tensor]:
    """The log precisions each factor is whitened by: [a, b_rep] for a weight, [d] for a
    1-D tensor (one per entry)."""
    if len(factors) == 2:
        return list(unit_log_grid(tp, shape))
    return [tp.expand(shape).reshape(-1)]


def whitened_decompositions(
    parts: list[tuple[list[torch.Tensor], TensorPrecision, torch.Size, WhitenedEigenCache | None]],
    logws: list[list[torch.Tensor]],
) -> list[list[WhitenedDecomposition]]:
    """The eigendecomposition of every factor of every block whitened by its log precisions
    ``logws`` (see :func:`whitening_vectors`): from the block's cache or the kept factor's
    memo when the whitening did not change, the rest in one stacked ``eigh`` per size."""
    found: list[list] = []
    todo: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
    for i, ((factors, _, _, cache), ws) in enumerate(zip(parts, logws)):
        row = []
        for j, (F, u) in enumerate(zip(factors, ws)):
            hit = cache.lookup(j, u.detach()) if cache is not None else None
            if hit is None:
                hit = _kept_whitened(F, u.detach())
            row.append(hit)
            if hit is None:
                with torch.no_grad():  # D^{-½} F D^{-½}; eigh reads one triangle only
                    w = torch.exp(-0.5 * u)
                    mat = (F * w).mul_(w[:, None])
                todo.setdefault((mat.shape[-1], mat.dtype, mat.device), []).append((i, j, mat))
        found.append(row)
    for items in todo.values():
        values, vectors = torch.linalg.eigh(torch.stack([mat for _, _, mat in items]))
        for k, (i, j, _) in enumerate(items):
            found[i][j] = WhitenedDecomposition(values[k].clamp_min(0.0), vectors[k])
            cache = parts[i][3]
            if cache is not None:
                cache.store(j, logws[i][j], found[i][j])
            _keep_whitened(parts[i][0][j], logws[i][j], found[i][j])
    return found


def _whitened_eigen(
    parts: list[tuple[list[torch.Tensor], TensorPrecision, torch.Size, WhitenedEigenCache | None]],
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """(λ, Q) of every whitened factor of every block (:func:`whitened_decompositions`),
    differentiable in λ w.r.t. the whitening.

    No autograd through ``eigh``: for F̃ = D^{-½} F D^{-½}, D = diag(e^u), first-order
    perturbation gives ∂λ_i/∂u_m = −λ_i Q_mi² exactly (also for repeated eigenvalues, as
    log det is a spectral function). λ is returned as λ·exp(−(Q∘Q)ᵀ(u − u₀)) with u₀ = u
    detached: the same value, and this exact first derivative."""
    logws = [whitening_vectors(factors, tp, shape) for factors, tp, shape, _ in parts]
    out = []
    for row, ws in zip(whitened_decompositions(parts, logws), logws):
        pairs = []
        for whitened, u in zip(row, ws):
            values = whitened.values
            if u.requires_grad:
                values = values * torch.exp(-(whitened.squared.T @ (u - u.detach())))
            pairs.append((values, whitened.vectors))
        out.append(pairs)
    return out


def whitened_unit_eigen(
    factors: list[torch.Tensor],
    tp: TensorPrecision,
    shape: torch.Size,
    scale,
    cache: WhitenedEigenCache | None = None,
) -> BlockEigen:
    """Exact unitwise block through whitened factors (decomposed for each (a, b), or taken
    from ``cache`` when it holds the decomposition for the same whitening)."""
    ((l1, q1), *rest) = _whitened_eigen([(factors, tp, shape, cache)])[0]
    if len(factors) == 2:
        a, b_rep = unit_log_grid(tp, shape)
        (l2, q2) = rest[0]
        denom = scale * torch.outer(l1, l2) + 1.0
        return BlockEigen(q1, q2, denom, -0.5 * (a[:, None] + b_rep[None, :]))
    d = tp.expand(shape).reshape(-1)
    return BlockEigen(q1, None, (scale * l1 + 1.0)[:, None], -0.5 * d[:, None])


def unitwise_logdet(blocks: list[tuple], scale) -> torch.Tensor:
    """Σ over unitwise Kronecker blocks of their exact log det.

    ``blocks``: ``(factors, tp, shape[, cache])`` per block. Same value as
    ``whitened_unit_eigen(...).logdet()`` per block; the whitened factors of equal size are
    decomposed in one stacked call per size (one solver launch per size on a GPU), factors
    whose whitening did not change since the cached decomposition not at all — this runs at
    every hyperstep. Differentiable (first order) w.r.t. the log precisions and ``scale``.
    """
    parts = [(b[0], b[1], b[2], b[3] if len(b) > 3 else None) for b in blocks]
    kron = [part for part in parts if len(part[0]) == 2]
    terms = [
        _vector_logdet(part[0][0], part[1], part[2], scale) for part in parts if len(part[0]) == 1
    ]
    for (factors, tp, shape, _), pairs in zip(kron, _whitened_eigen(kron)):
        a, b_rep = whitening_vectors(factors, tp, shape)  # −2 Σ log w = Σ_mn (a_m + b_n)
        f64 = torch.float64
        term = a.sum(dtype=f64) * b_rep.numel() + b_rep.sum(dtype=f64) * a.numel()
        l1, l2 = pairs[0][0], pairs[1][0]
        terms.append(term + float64_sum(torch.log(scale * torch.outer(l1, l2) + 1.0)))
    return torch.stack(terms).sum()


def _vector_logdet(G: torch.Tensor, tp: TensorPrecision, shape: torch.Size, scale) -> torch.Tensor:
    """log det(s·G + diag(e^d)) of a 1-D tensor (a bias: one precision per entry) by
    Cholesky — a fraction of an eigendecomposition's cost, and this runs at every
    evaluation — with its exact first derivatives ∂/∂d_k = e^{d_k} (Π⁻¹)_kk and
    ∂/∂s = Σ Π⁻¹ ∘ G attached; the whitened eigendecomposition where Cholesky fails (a
    precision singular to working precision)."""
    d = tp.expand(shape).reshape(-1)
    with torch.no_grad():
        precision = scale * G + torch.diag(d.exp())
        factor, info = torch.linalg.cholesky_ex(precision)
    if int(info) != 0:
        ((values, _),) = _whitened_eigen([([G], tp, shape, None)])[0]
        return d.sum(dtype=torch.float64) + float64_sum(torch.log(scale * values + 1.0))
    with torch.no_grad():
        value = 2.0 * factor.diagonal().log().sum(dtype=torch.float64)
        inverse = torch.cholesky_inverse(factor)
    value = value + (d.detach().exp() * inverse.diagonal() * (d - d.detach())).sum()
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        value = value + (inverse * G).sum() * (scale - scale.detach())
    return value


@dataclass
class StackedEigen(BlockEigen):
    """A row-sliced block's precision in its eigenbasis, stacked over the g slices: the
    fields of :class:`BlockEigen` with a leading slice dimension (q1 (g, r, r), q2 (g, d, d),
    denom and log_w (g, r, d)); every operation runs on all slices at once."""

    @classmethod
    def stack(cls, parts: list[BlockEigen]) -> StackedEigen:
        def both(field: str):
            values = [getattr(part, field) for part in parts]
            return None if values[0] is None else torch.stack(values)

        return cls(both("q1"), both("q2"), both("denom"), both("log_w"))

    def inverse_diag(self) -> torch.Tensor:
        """(out, q): the slices' diagonals of Π⁻¹, row slice after row slice."""
        out = super().inverse_diag()
        return out.reshape(-1, out.shape[-1])

    def quadratic(self, J: torch.Tensor) -> torch.Tensor:
        """(B, C, C) J Π⁻¹ Jᵀ for J of shape (B, C, out, q): a sum over the slices."""
        slices, rows = self.denom.shape[0], self.denom.shape[1]
        J = J.reshape(J.shape[0], J.shape[1], slices, rows, J.shape[-1])
        return _sliced_quadratic(J, self.q1, self.q2, self.denom, self.log_w)


class DiagBlock:
    """An exact diagonal block h (shaped like the parameter): Π = s·diag(h) + diag(δ)."""

    def __init__(self, h: torch.Tensor, shape: torch.Size):
        self.h = h
        self.shape = torch.Size(shape)

    def public_factors(self) -> torch.Tensor:
        return self.h

    def kron_parts(self) -> list[KronBlock]:
        return []

    def curvature_diag(self) -> torch.Tensor:
        return self.h.reshape(-1)

    def factor_diagonals(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per consecutive run of entries: (diag G, diag A) — here the diagonal itself."""
        return [(self.h.reshape(-1), None)]

    def uses_plan(self, prior_kind: str) -> bool:
        return True

    def plan_eigenvalues(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h = self.h.reshape(-1)
        return [(h, h.new_ones(1))]

    def plan_deltas(self, tp: TensorPrecision) -> list[torch.Tensor]:
        return [tp.expand(self.shape).exp().reshape(-1, 1)]

    def unitwise_parts(self, tp: TensorPrecision) -> list:
        return []

    def side_costs(self) -> tuple[int, int, int]:
        """Multiply-adds of a parameterwise evaluation and of its row/column couplings."""
        return self.h.numel(), 0, 0

    def shift_sides(self) -> tuple[int, int]:
        """(0, 0): no two rows' or columns' shifts share a term of the log det."""
        return 0, 0

    def parameterwise_terms(
        self,
        delta: torch.Tensor,
        scale,
        rows=False,
        cols=False,
        matrix: str | None = None,
        shift: ShiftTarget | None = None,
    ):
        """:class:`ProjectedTerms` for per-entry precisions ``delta`` (a (p, q) matrix):
        exact, the entries uncoupled (so there is no coupling ``matrix`` to ask for); with a
        ``shift`` target, of δ·e^t for the block's best shift t."""
        if matrix is not None:
            raise ValueError("a diagonal block's rows and columns are uncoupled: matrix=None")
        h, scale = self.h.reshape(delta.shape), float(scale)
        t = best_shift(shift, delta, h, scale) if shift is not None else 0.0
        c, inverse, total, along = projected_precision(delta, h, scale, math.exp(t), int(rows))
        col_sums = None
        if cols:  # (δ/c)² down each column; the kernel summed along the rows (or nothing)
            col_sums = (delta * (math.exp(t) * inverse)).square().sum(-2)
        return ProjectedTerms(
            float64_sum(c.log_()),
            inverse,
            total.to(c.dtype),
            along if rows else None,
            col_sums,
            shift=t,
        )

    def eigen(self, tp: TensorPrecision, scale, unitwise: bool) -> BlockEigen:
        # laid out like the (p, q) view of the block that J and inverse_diag use
        h = self.h.reshape(weight_matrix_shape(self.shape))
        delta = tp.expand(self.shape).exp().reshape(h.shape)
        return BlockEigen(None, None, scale * h + delta, None)


def kron_shift_sides(shape: torch.Size, n_factors: int) -> tuple[int, int]:
    """(rows, columns) of a Kronecker block's (p, q) weight matrix whose shifts of log δ
    are coupled through its projection: no columns for a bias (one factor, one column)."""
    p, q = weight_matrix_shape(shape)
    return p, (q if n_factors == 2 else 0)


class KronBlock:
    """One Kronecker block: a weight's ``[G, A]`` (Π = s·G ⊗ A + D, vec row-major) or a
    bias's ``[G]``. Its factors' eigendecompositions are set once per fit by
    :func:`decompose_kron_blocks` (shared by every prior except unitwise): the eigenvalues
    always, the eigenvectors only when asked for or first needed (:meth:`basis`) — the
    scalar/layerwise evidence and its hyperparameter updates use eigenvalues alone."""

    def __init__(self, factors: list[torch.Tensor], shape: torch.Size, name: str):
        self.factors = list(factors)
        self.shape = torch.Size(shape)
        self.name = name
        self.values: list[torch.Tensor] | None = None
        self.vectors: list[torch.Tensor] | None = None
        self._squared: SquaredBasis | None = None  # see squared_basis
        self._products: torch.Tensor | None = None  # λ1λ2ᵀ, once a parameterwise δ needs it
        self.unit_cache = WhitenedEigenCache()

    def public_factors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.factors)

    def kron_parts(self) -> list[KronBlock]:
        return [self]

    def curvature_diag(self) -> torch.Tensor:
        g = self.factors[0].diagonal()
        return (
            g if len(self.factors) == 1 else torch.outer(g, self.factors[1].diagonal()).reshape(-1)
        )

    def factor_diagonals(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        a = self.factors[1].diagonal() if len(self.factors) == 2 else None
        return [(self.factors[0].diagonal(), a)]

    def uses_plan(self, prior_kind: str) -> bool:
        """Unitwise blocks are decomposed anew per (a, b); the others reuse one eigenbasis."""
        return prior_kind != "unitwise"

    def needs_decomposition(self, vectors: bool) -> bool:
        return self.values is None or (vectors and self.vectors is None)

    def set_decomposition(self, pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Eigenvalues and (when given) eigenvectors of the factors. Eigenvalues already
        set are kept, so everything computed from them (a packed log det plan, the evidence
        the hyperparameters were fitted to) stays consistent; the two decompositions agree
        to round-off."""
        if self.values is None:
            self.values = [values for values, _ in pairs]
        if pairs[0][1] is not None:
            self.vectors = [vectors for _, vectors in pairs]

    def basis(self) -> list[torch.Tensor]:
        """The factors' eigenvectors, decomposed now if only the eigenvalues were."""
        if self.vectors is None:
            decompose_kron_blocks([self], vectors=True)
        return self.vectors

    def eigenvalues(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.values
        l2 = values[1] if len(values) == 2 else values[0].new_ones(1)
        return values[0], l2

    def plan_eigenvalues(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.eigenvalues()]

    def projected_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """δ̃ = (Q1∘Q1)ᵀ D (Q2∘Q2) for a (p, q) precision matrix D (parameterwise)."""
        vectors = self.basis()
        out = vectors[0].square().T @ delta
        if len(vectors) == 2:
            out = out @ vectors[1].square()
        return out

    def _delta(self, tp: TensorPrecision) -> torch.Tensor:
        """0-d δ (scalar/layerwise) or the projected (p, q) δ̃ (parameterwise)."""
        if tp.kind == "scalar":
            return tp.log_delta.exp()
        D = tp.expand(self.shape).exp().reshape(weight_matrix_shape(self.shape))
        return self.projected_delta(D)

    def plan_deltas(self, tp: TensorPrecision) -> list[torch.Tensor]:
        return [self._delta(tp)]

    def unitwise_parts(self, tp: TensorPrecision) -> list:
        """Arguments of :func:`unitwise_logdet` for this block."""
        return [(self.factors, tp, self.shape, self.unit_cache)]

    def squared_basis(self) -> SquaredBasis:
        """The projection of a parameterwise δ onto the eigenbasis, kept while the
        hyperparameters move."""
        if self._squared is None:
            vectors = self.basis()
            self._squared = SquaredBasis(vectors[0], vectors[1] if len(vectors) == 2 else None)
        return self._squared

    def side_costs(self) -> tuple[int, int, int]:
        """Multiply-adds of a parameterwise evaluation and of its row/column couplings."""
        p, q = weight_matrix_shape(self.shape)
        return side_costs(p, q if len(self.factors) == 2 else 1)

    def shift_sides(self) -> tuple[int, int]:
        """How many rows and columns have shifts coupled through the projection (0 columns
        for a bias: it has one)."""
        return kron_shift_sides(self.shape, len(self.factors))

    def parameterwise_terms(
        self,
        delta: torch.Tensor,
        scale,
        rows=False,
        cols=False,
        matrix: str | None = None,
        shift: ShiftTarget | None = None,
    ):
        """Parameterwise (p, q) ``delta``: :class:`ProjectedTerms` — Σ log(s·λ1λ2ᵀ + δ̃), the
        log det of :meth:`eigen`, and (Q1∘Q1)(1/c)(Q2∘Q2)ᵀ, the diagonal of its inverse
        and ∂ log det / ∂δ (δ̃ is linear in δ); row/column couplings and one side's
        coupling matrix when asked for."""
        basis = self.squared_basis()  # decomposes the factors if they were not yet
        if self._products is None:
            l1, l2 = self.eigenvalues()
            self._products = torch.outer(l1, l2)
        return projected_terms(basis, self._products, delta, scale, rows, cols, matrix, shift)

    def eigen(self, tp: TensorPrecision, scale, unitwise: bool) -> BlockEigen:
        if unitwise:
            return whitened_unit_eigen(self.factors, tp, self.shape, scale, self.unit_cache)
        l1, l2 = self.eigenvalues()
        vectors = self.basis()
        q2 = vectors[1] if len(vectors) == 2 else None
        return BlockEigen(vectors[0], q2, scale * torch.outer(l1, l2) + self._delta(tp), None)


class RowSlicedKronBlock:
    """Block-diagonal over equal row slices, each its own :class:`KronBlock` — a grouped or
    depthwise convolution (one slice per group) or attention's packed q/k/v projection (three
    slices). Factors are stacked: G (slices, r, r), A (slices, d, d). Every quantity (log
    det, precision and covariance diagonals, J Σ Jᵀ) is exact slice by slice, with the
    prior's rows split the same way (unitwise: a per row, b shared by the slices)."""

    def __init__(self, factors: list[torch.Tensor], shape: torch.Size, name: str):
        self.factors = list(factors)
        self.shape = torch.Size(shape)
        n_slices = factors[0].shape[0]
        if self.shape[0] % n_slices:
            raise ValueError(f"{name}: {self.shape[0]} rows do not split into {n_slices} slices")
        self.rows = self.shape[0] // n_slices
        part_shape = torch.Size((self.rows, *self.shape[1:]))
        self.parts = [
            KronBlock([F[j] for F in factors], part_shape, f"{name}[{j}]") for j in range(n_slices)
        ]
        self._products: torch.Tensor | None = None
        self._vectors: tuple | None = None
        self._squared: SquaredBasis | None = None  # of the stacked vectors, once needed

    def public_factors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.factors)

    def kron_parts(self) -> list[KronBlock]:
        return self.parts

    def _split(self, tp: TensorPrecision) -> list[TensorPrecision]:
        return [tp.row_slice(j * self.rows, (j + 1) * self.rows) for j in range(len(self.parts))]

    def curvature_diag(self) -> torch.Tensor:
        g = self.factors[0].diagonal(dim1=1, dim2=2)  # (slices, r)
        if len(self.factors) == 1:
            return g.reshape(-1)
        return (g.unsqueeze(2) * self.factors[1].diagonal(dim1=1, dim2=2).unsqueeze(1)).reshape(-1)

    def factor_diagonals(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One run of entries (the fused op takes an exact diagonal when slices differ)."""
        return [(self.curvature_diag(), None)]

    def uses_plan(self, prior_kind: str) -> bool:
        return prior_kind != "unitwise"

    def _stacked_products(self) -> torch.Tensor:
        """λ1 ⊗ λ2 per slice, (g, r, d), from the parts' eigenvalues."""
        if self._products is None:
            l1 = torch.stack([part.eigenvalues()[0] for part in self.parts])
            l2 = torch.stack([part.eigenvalues()[1] for part in self.parts])
            self._products = l1.unsqueeze(2) * l2.unsqueeze(1)
        return self._products

    def _stacked_vectors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Q1 (g, r, r), Q2 (g, d, d) or None) from the parts' eigenvectors."""
        if self._vectors is None:
            bases = [part.basis() for part in self.parts]
            q1 = torch.stack([basis[0] for basis in bases])
            q2 = torch.stack([basis[1] for basis in bases]) if len(self.factors) == 2 else None
            self._vectors = (q1, q2)
        return self._vectors

    def plan_eigenvalues(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole block as one plan entry: the products λ1_p λ2_q of every slice, with
        λ2 ≡ 1 (Σ log(s·λ + δ) is the same sum)."""
        products = self._stacked_products().reshape(-1)
        return [(products, products.new_ones(1))]

    def _delta(self, tp: TensorPrecision) -> torch.Tensor:
        """0-d δ, or the per-slice projected δ̃ = (Q1∘Q1)ᵀ D (Q2∘Q2), (g, r, d)."""
        if tp.kind == "scalar":
            return tp.log_delta.exp()
        q1, q2 = self._stacked_vectors()
        D = tp.expand(self.shape).exp().reshape(len(self.parts), self.rows, -1)
        out = q1.square().mT @ D
        return out @ q2.square() if q2 is not None else out

    def plan_deltas(self, tp: TensorPrecision) -> list[torch.Tensor]:
        delta = self._delta(tp)
        return [delta if delta.ndim == 0 else delta.reshape(-1, 1)]

    def unitwise_parts(self, tp: TensorPrecision) -> list:
        return [x for part, t in zip(self.parts, self._split(tp)) for x in part.unitwise_parts(t)]

    def side_costs(self) -> tuple[int, int, int]:
        """Multiply-adds of a parameterwise evaluation and of its row/column couplings."""
        q = weight_matrix_shape(self.shape)[1] if len(self.factors) == 2 else 1
        return side_costs(self.rows, q, len(self.parts))

    def shift_sides(self) -> tuple[int, int]:
        """:meth:`KronBlock.shift_sides` over all slices' rows."""
        return kron_shift_sides(self.shape, len(self.factors))

    def parameterwise_terms(
        self,
        delta: torch.Tensor,
        scale,
        rows=False,
        cols=False,
        matrix: str | None = None,
        shift: ShiftTarget | None = None,
    ):
        """:meth:`KronBlock.parameterwise_terms` slice by slice, ``delta`` (out, d); a
        column's shift moves every slice, so its couplings sum over them, and rows of
        different slices are uncoupled (a block-diagonal row matrix)."""
        if self._squared is None:
            self._squared = SquaredBasis(*self._stacked_vectors())
        D = delta.reshape(len(self.parts), self.rows, -1)
        products = self._stacked_products()
        terms = projected_terms(self._squared, products, D, scale, rows, cols, matrix, shift)
        terms.inverse = terms.inverse.reshape(delta.shape)
        if rows:
            terms.row_coupling = terms.row_coupling.reshape(-1)
        if cols:
            terms.col_coupling = terms.col_coupling.sum(0)
        return terms

    def eigen(self, tp: TensorPrecision, scale, unitwise: bool) -> StackedEigen:
        if unitwise:  # whitened per slice (each slice has its own rows of a)
            return StackedEigen.stack(
                [part.eigen(t, scale, True) for part, t in zip(self.parts, self._split(tp))]
            )
        q1, q2 = self._stacked_vectors()
        return StackedEigen(q1, q2, scale * self._stacked_products() + self._delta(tp), None)


CurvatureBlock = DiagBlock | KronBlock | RowSlicedKronBlock


def curvature_blocks(factors: list, names: list[str], shapes: list) -> list[CurvatureBlock]:
    """One typed block per parameter tensor from its curvature: a tensor (exact diagonal),
    2-D factors (Kronecker) or stacked 3-D factors (row-sliced Kronecker)."""
    out: list[CurvatureBlock] = []
    for block, name, shape in zip(factors, names, shapes, strict=True):
        if isinstance(block, torch.Tensor):
            out.append(DiagBlock(block, shape))
        elif block[0].ndim == 3:
            out.append(RowSlicedKronBlock(block, shape, name))
        else:
            out.append(KronBlock(block, shape, name))
    return out


def decompose_kron_blocks(blocks: list[CurvatureBlock], vectors: bool = True) -> None:
    """Eigendecompose every Kronecker factor once, batched by size: eigenvalues, and with
    ``vectors`` the eigenvectors too (parts that already have what is asked are skipped)."""
    parts = [
        part for block in blocks for part in block.kron_parts() if part.needs_decomposition(vectors)
    ]
    mats, labels = [], []
    for part in parts:
        for j, F in enumerate(part.factors):
            mats.append(F)
            labels.append(f"{part.name}[{'GA'[j]}]")
    decomposed = iter(batched_eigh(mats, labels, vectors))
    for part in parts:
        part.set_decomposition([next(decomposed) for _ in part.factors])
