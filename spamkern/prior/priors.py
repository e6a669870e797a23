"""Sparsity-inducing Gaussian priors whose log precisions marginal likelihood learns.

All four priors store their hyperparameters as ONE flat ``nn.Parameter`` of log precisions
(easy to optimise, checkpoint and all-reduce) and expand it per parameter tensor:

===============  =========================================  ==================================
prior            hyperparameters                            precision of entry (m, n) of tensor l
===============  =========================================  ==================================
scalar           1                                          δ
layerwise        one per parameter tensor                   δ_l
unitwise         per ≥2-D tensor a ∈ R^out, b ∈ R^in;       exp(a_m + b_n), shared over the
                 per 1-D tensor one per entry               kernel positions of a conv weight
parameterwise    P                                          δ_i
===============  =========================================  ==================================

"in" is dim 1 of the tensor: in/g for a grouped convolution's weight (out, in/g, k…), whose b
is then shared by its groups; E for attention's packed ``in_proj_weight`` (3E, E). Blocks
that are block-diagonal over row slices (convolution groups, q/k/v) take each slice's rows
of the precision with :meth:`TensorPrecision.row_slice`.

Initial value: log δ = log(T · prior_precision) for every entry; unitwise splits it evenly,
a_m = b_n = ½ log(T · prior_precision), so a_m + b_n is exactly that value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

PRIORS = ("scalar", "layerwise", "unitwise", "parameterwise")


@dataclass(frozen=True)
class TensorSlot:
    """Where one parameter tensor's hyperparameters live in the flat log-precision vector."""

    name: str
    shape: torch.Size
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) >= 1 else 1

    @property
    def cols(self) -> int:
        """Input units of a ≥2-D tensor (dim 1); 1 otherwise."""
        return self.shape[1] if len(self.shape) >= 2 else 1

    @property
    def positions(self) -> int:
        """Entries that share one (row, col) hyperparameter pair (conv kernel positions)."""
        return int(math.prod(self.shape[2:])) if len(self.shape) > 2 else 1


@dataclass
class TensorPrecision:
    """One tensor's log precision in its structured form (what the log det needs).

    ``kind`` is "scalar" (``log_delta`` 0-d), "unit" (``a`` rows, ``b`` cols, per-unit logs),
    or "full" (``log_delta`` shaped like the tensor).
    """

    kind: str
    log_delta: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def expand(self, shape: torch.Size) -> torch.Tensor:
        """Log precision of every entry, shaped like the parameter tensor."""
        if self.kind == "scalar":
            return self.log_delta.expand(shape)
        if self.kind == "full":
            return self.log_delta.reshape(shape)
        grid = self.a.unsqueeze(1) + self.b.unsqueeze(0)  # (rows, cols)
        extra = (1,) * (len(shape) - 2)
        return grid.reshape(*grid.shape, *extra).expand(shape)

    def row_slice(self, start: int, stop: int) -> TensorPrecision:
        """The precision of rows ``start:stop`` (one slice of a block that is block-diagonal
        over rows: a convolution group, attention's q, k or v); unitwise keeps the shared b."""
        if self.kind == "scalar":
            return self
        if self.kind == "full":
            return TensorPrecision("full", log_delta=self.log_delta[start:stop])
        return TensorPrecision("unit", a=self.a[start:stop], b=self.b)


class Prior(nn.Module):
    """Base: a flat vector of log precisions and the rule that expands it per tensor."""

    kind: str = ""

    def __init__(
        self,
        named_shapes: list[tuple[str, torch.Size]],
        slots: list[TensorSlot],
        init_log: float,
        dtype: torch.dtype,
        device: torch.device | None,
    ):
        super().__init__()
        self.slots = slots
        self.n_params = sum(int(math.prod(shape)) for _, shape in named_shapes)
        n_hyper = slots[-1].stop if slots else 0
        self.log_precision = nn.Parameter(torch.zeros(n_hyper, dtype=dtype, device=device))
        with torch.no_grad():  # the subclass rule decides how one value spreads (unitwise: halves)
            self.log_precision.copy_(self._from_scalar(self.log_precision.new_tensor(init_log)))

    # -- subclasses define how the flat vector maps onto tensors ---------------------------
    def tensor_precision(self, slot: TensorSlot, log_precision: torch.Tensor) -> TensorPrecision:
        raise NotImplementedError

    # -- shared API ------------------------------------------------------------------------
    def per_tensor(self, log_precision: torch.Tensor | None = None) -> list[TensorPrecision]:
        """Structured log precisions of every tensor (differentiable in ``log_precision``)."""
        lp = self.log_precision if log_precision is None else log_precision
        return [self.tensor_precision(slot, lp) for slot in self.slots]

    def log_precision_diag(self, log_precision: torch.Tensor | None = None) -> torch.Tensor:
        """(P,) log δ of every parameter, flattened in parameter order."""
        parts = [
            tp.expand(slot.shape).reshape(-1)
            for slot, tp in zip(self.slots, self.per_tensor(log_precision))
        ]
        return torch.cat(parts)

    def precision_diag(self, log_precision: torch.Tensor | None = None) -> torch.Tensor:
        """(P,) prior precision δ of every parameter, aligned with ``model.parameters()``."""
        return self.log_precision_diag(log_precision).exp()

    @torch.no_grad()
    def group_sums(self, per_param: torch.Tensor) -> torch.Tensor:
        """Σ over the parameters each hyperparameter governs, for a (P,) ``per_param`` —
        the adjoint of :meth:`log_precision_diag` (a unitwise entry counts in its row's a
        and its column's b), in the layout of ``log_precision``."""
        out = per_param.new_zeros(self.log_precision.shape)
        offset = 0
        for slot, tp in zip(self.slots, self.per_tensor(self.log_precision.detach())):
            n = max(1, math.prod(slot.shape))
            part = per_param[offset : offset + n]
            offset += n
            if tp.kind == "scalar":
                out[slot.start] += part.sum()
            elif tp.kind == "unit":
                grid = part.reshape(slot.rows, slot.cols, -1)
                out[slot.start : slot.start + slot.rows] += grid.sum((1, 2))
                out[slot.start + slot.rows : slot.stop] += grid.sum((0, 2))
            else:
                out[slot.start : slot.stop] += part
        return out

    def set_precision(self, value) -> None:
        """Overwrite the precisions in place (any shape :meth:`to_log_precision` accepts)."""
        with torch.no_grad():
            self.log_precision.copy_(self.to_log_precision(value))

    def to_log_precision(self, value) -> torch.Tensor:
        """Convert a user precision to this prior's flat log vector (keeps autograd).

        Accepted: a float; a tensor shaped like ``log_precision`` (precisions, not logs); or
        laplace-torch's shapes — length 1, length = number of parameter tensors, length P.
        """
        lp = self.log_precision
        value = torch.as_tensor(value, dtype=lp.dtype, device=lp.device)
        if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
            raise ValueError("prior precisions must be finite and > 0")
        n_hyper, n_tensors = lp.numel(), len(self.slots)
        if value.ndim == 0 or value.numel() == 1:
            return self._from_scalar(value.reshape(()).log())
        if value.ndim != 1:
            raise ValueError(
                f"prior precision must be a scalar or a vector, got {tuple(value.shape)}"
            )
        if value.numel() == n_hyper:
            return value.log()
        if value.numel() == n_tensors:
            return self._from_per_tensor(value.log())
        if value.numel() == self.n_params:
            return self._from_per_parameter(value.log())
        raise ValueError(
            f"a {self.kind} prior takes a prior precision of length 1, {n_hyper} (its "
            f"hyperparameters) or {n_tensors} (one per parameter tensor)"
            + (f" or {self.n_params} (one per parameter)" if self.kind == "parameterwise" else "")
            + f"; got length {value.numel()}"
        )

    def _from_scalar(self, log_value: torch.Tensor) -> torch.Tensor:
        """One precision for every parameter."""
        return log_value.expand(self.log_precision.numel()).clone()

    def _from_per_tensor(self, log_values: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"a {self.kind} prior cannot take one precision per parameter tensor")

    def _from_per_parameter(self, log_values: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"a {self.kind} prior cannot take one precision per parameter (length "
            f"{self.n_params}); use prior='parameterwise'"
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind}, hyperparameters={self.log_precision.numel()}"


def _packed_slots(named_shapes, width) -> list[TensorSlot]:
    """Consecutive slots of ``width(shape)`` hyperparameters per tensor."""
    slots, start = [], 0
    for name, shape in named_shapes:
        shape = torch.Size(shape)
        slots.append(TensorSlot(name, shape, start, start + width(shape)))
        start += width(shape)
    return slots


class ScalarPrior(Prior):
    kind = "scalar"

    def __init__(self, named_shapes, init_log, dtype=torch.float32, device=None):
        slots = [TensorSlot(n, torch.Size(s), 0, 1) for n, s in named_shapes]
        super().__init__(named_shapes, slots, init_log, dtype, device)

    def tensor_precision(self, slot, log_precision):
        return TensorPrecision("scalar", log_delta=log_precision[0])

    def _from_per_tensor(self, log_values):
        if bool((log_values != log_values[0]).any()):
            raise ValueError("a scalar prior takes one precision; the given values differ")
        return log_values[:1]


class LayerwisePrior(Prior):
    kind = "layerwise"

    def __init__(self, named_shapes, init_log, dtype=torch.float32, device=None):
        slots = [TensorSlot(n, torch.Size(s), i, i + 1) for i, (n, s) in enumerate(named_shapes)]
        super().__init__(named_shapes, slots, init_log, dtype, device)

    def tensor_precision(self, slot, log_precision):
        return TensorPrecision("scalar", log_delta=log_precision[slot.start])


class UnitwisePrior(Prior):
    kind = "unitwise"

    def __init__(self, named_shapes, init_log, dtype=torch.float32, device=None):
        def width(shape: torch.Size) -> int:  # a (rows) and b (cols), or one per entry
            return shape[0] + shape[1] if len(shape) >= 2 else max(1, math.prod(shape))

        super().__init__(named_shapes, _packed_slots(named_shapes, width), init_log, dtype, device)

    def tensor_precision(self, slot, log_precision):
        values = log_precision[slot.start : slot.stop]
        if len(slot.shape) >= 2:
            return TensorPrecision("unit", a=values[: slot.rows], b=values[slot.rows :])
        return TensorPrecision("full", log_delta=values.reshape(slot.shape))

    def _from_scalar(self, log_value):
        # a_m + b_n must equal the value, not twice it: split it as for one value per tensor
        return self._from_per_tensor(log_value.expand(len(self.slots)))

    def _from_per_tensor(self, log_values):
        parts = []
        for slot, value in zip(self.slots, log_values):
            width = slot.stop - slot.start
            fill = 0.5 * value if len(slot.shape) >= 2 else value
            parts.append(fill.expand(width))
        return torch.cat(parts)


class ParameterwisePrior(Prior):
    kind = "parameterwise"

    def __init__(self, named_shapes, init_log, dtype=torch.float32, device=None):
        slots = _packed_slots(named_shapes, lambda shape: max(1, math.prod(shape)))
        super().__init__(named_shapes, slots, init_log, dtype, device)

    def tensor_precision(self, slot, log_precision):
        return TensorPrecision(
            "full", log_delta=log_precision[slot.start : slot.stop].reshape(slot.shape)
        )

    def _from_per_tensor(self, log_values):
        return torch.cat([v.expand(s.stop - s.start) for s, v in zip(self.slots, log_values)])

    def _from_per_parameter(self, log_values):
        return log_values


_PRIOR_CLASSES = {
    "scalar": ScalarPrior,
    "layerwise": LayerwisePrior,
    "unitwise": UnitwisePrior,
    "parameterwise": ParameterwisePrior,
}


def make_prior(
    kind: str,
    named_params: list[tuple[str, torch.Tensor]],
    prior_precision=1.0,
    temperature: float = 1.0,
) -> Prior:
    """Build a prior over ``named_params`` initialised to ``temperature · prior_precision``.

    ``prior_precision`` takes any shape :meth:`Prior.to_log_precision` accepts.
    """
    if kind not in _PRIOR_CLASSES:
        raise ValueError(f"prior must be one of {PRIORS}, got {kind!r}")
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    first = named_params[0][1]
    named_shapes = [(name, p.shape) for name, p in named_params]
    prior = _PRIOR_CLASSES[kind](named_shapes, 0.0, dtype=first.dtype, device=first.device)
    value = torch.as_tensor(prior_precision, dtype=first.dtype, device=first.device)
    prior.set_precision(value * temperature)
    return prior
