"""The optimiser step of a SpaM epoch: the prior's gradient, then Adam, in torch's fused kernel.

``torch.optim.Adam.step`` spends about 0.15 ms of Python per call on one CPU core
(profiling scope, state lookups, grouping by device) — more than half of what its fused
kernel takes on the 270 k-parameter MLP of ``bench/bench_training.py``, about 5 % of a
MAP epoch there. Once the optimiser's own ``step`` has created its state (the first step
of every epoch goes through it), :class:`OptimizerStep` calls the same kernel,
``torch._fused_adam_``, on that state with the same arguments, so parameters and state
are bit for bit those of ``optimizer.step()``.

The prior's gradient (T/N)·δ∘θ of a tensor with a single δ is the kernel's L2
``weight_decay`` — one kernel call per distinct δ (a layerwise prior) instead of an extra
pass over every gradient, again bit for bit the same as adding it first. Tensors with one δ
per entry (unitwise, parameterwise) get it added to their gradient beforehand.

Anything else — SGD, a non-fused Adam, AMSGrad, a tensor learning rate, parameters on
several devices or dtypes — takes ``prior_gradient()`` then ``optimizer.step()``.
"""

from __future__ import annotations

import torch
from torch import nn

from spamkern.prior.priors import Prior

# Adam options the kernel call below does not pass on: any of these set → optimizer.step()
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


class PriorGradient:
    """Adds ∇ (T/2N) Σ δ θ² = (T/N)·δ∘θ to the gradients, δ frozen by :meth:`refresh`.

    Tensors with one δ (scalar and layerwise priors) take a fused ``g += c·θ`` per
    distinct δ, which reads a third less memory than the general ``g += c·δ∘θ`` that
    unitwise and parameterwise tensors take. When all of ``params`` share one δ and form
    the single parameter group of ``optimizer``, c is that group's ``weight_decay`` (the
    same L2 gradient, added inside the optimiser's step).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        prior: Prior,
        temperature: float,
        n_data: int,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.params = params
        self.optimizer = optimizer  # its group is read at refresh (a restore replaces it)
        self.prior = prior
        self.scale = temperature / n_data
        # (T/N)·δ → the tensors with that single δ (their indices and themselves)
        self.uniform: dict[float, tuple[list[int], list[nn.Parameter]]] = {}
        self.full: list[int] = []  # tensors with one δ per entry
        self.full_params: list[nn.Parameter] = []
        self.deltas: list[torch.Tensor] = []

    @torch.no_grad()
    def refresh(self) -> None:
        """Take the prior's current precisions (once per epoch: δ is fixed within one)."""
        tps = self.prior.per_tensor()
        single = [i for i, tp in enumerate(tps) if tp.kind == "scalar"]
        values = torch.stack([tps[i].log_delta for i in single]).exp().tolist() if single else []
        by_value: dict[float, list[int]] = {}
        for i, value in zip(single, values):
            by_value.setdefault(value, []).append(i)
        self.uniform = {
            self.scale * value: (group, [self.params[i] for i in group])
            for value, group in by_value.items()
        }
        self.full = [i for i, tp in enumerate(tps) if tp.kind != "scalar"]
        self.full_params = [self.params[i] for i in self.full]
        self.deltas = [tps[i].expand(self.params[i].shape).exp().contiguous() for i in self.full]
        self._to_weight_decay()

    def _to_weight_decay(self) -> None:
        """Hand one shared δ to the optimiser's single group as its weight decay."""
        if self.optimizer is None or not _one_group_of(self.optimizer, self.params):
            return
        group = self.optimizer.param_groups[0]
        if len(self.uniform) == 1 and not self.full:
            group["weight_decay"] = next(iter(self.uniform))
            self.uniform = {}
        else:
            group["weight_decay"] = 0.0

    @torch.no_grad()
    def __call__(self) -> None:
        grads = self._grads()
        for alpha, (group, params) in self.uniform.items():
            torch._foreach_add_([grads[i] for i in group], params, alpha=alpha)
        self._add_full(grads)

    @torch.no_grad()
    def add_full(self) -> None:
        """Only the tensors with one δ per entry: a fused step applies the others' prior
        gradient as its weight decay (see :meth:`weight_decays`)."""
        self._add_full(self._grads())

    def weight_decays(self, group: dict) -> list[tuple[list[int], float]]:
        """Tensor indices by the L2 weight decay that applies their prior gradient inside a
        fused step: (T/N)·δ per distinct single δ; the optimiser group's own for the rest
        (the shared δ once :meth:`refresh` moved it there, else 0: :meth:`add_full` adds
        theirs)."""
        calls = [(indices, alpha) for alpha, (indices, _) in self.uniform.items()]
        covered = {i for indices, _ in calls for i in indices}
        rest = [i for i in range(len(self.params)) if i not in covered]
        return calls + ([(rest, group["weight_decay"])] if rest else [])

    def _grads(self) -> list[torch.Tensor]:
        """The gradients, zeros for a tensor the loss does not reach (it feels the prior)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def _add_full(self, grads: list[torch.Tensor]) -> None:
        if self.full:
            full_grads = [grads[i] for i in self.full]
            torch._foreach_addcmul_(full_grads, self.deltas, self.full_params, value=self.scale)


def make_optimizer(
    params: list[nn.Parameter], name: str, lr: float, momentum: float
) -> torch.optim.Optimizer:
    """Adam or SGD on torch's fused kernels where the parameters' device and dtype have
    them: one pass over each tensor per step instead of one per elementwise op."""
    kind = torch.optim.Adam if name == "adam" else torch.optim.SGD
    options = {"lr": lr} if name == "adam" else {"lr": lr, "momentum": momentum}
    try:
        return kind(params, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device or dtype
        return kind(params, **options)


class OptimizerStep:
    """One optimiser step on the SpaM objective: ``prior_gradient`` and ``optimizer`` as
    one call. :meth:`refresh` at the start of every epoch (after the prior changed)."""

    def __init__(self, prior_gradient: PriorGradient, optimizer: torch.optim.Optimizer):
        self.prior_gradient = prior_gradient
        self.optimizer = optimizer
        # this epoch's kernel calls: (params, exp_avgs, exp_avg_sqs, steps, weight decay)
        self._calls: list[tuple[list, list, list, list, float]] | None = None
        self._steps: list[torch.Tensor] = []  # every tensor's step count, advanced at once
        self._prepared = False  # whether this epoch's kernel calls were looked for

    def refresh(self) -> None:
        """Take the prior's current δ; the epoch's first step goes through the optimiser
        (state created or restored since the last epoch is then in place)."""
        self.prior_gradient.refresh()
        self._calls = None
        self._prepared = False

    def __call__(self) -> None:
        if self._calls is None:
            self.prior_gradient()
            self.optimizer.step()
            if not self._prepared:
                self._prepare()
            return
        self.prior_gradient.add_full()
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(self._steps, 1)
        for params, exp_avgs, exp_avg_sqs, steps, weight_decay in self._calls:
            torch._fused_adam_(
                params,
                [p.grad for p in params],
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                eps=group["eps"],
                maximize=False,
            )

    def _prepare(self) -> None:
        """The kernel calls of this epoch, if the optimiser is one the call reproduces."""
        params = self.prior_gradient.params
        self._prepared = True
        if not _direct_kernel_reproduces(self.optimizer, params):
            return
        state = [self.optimizer.state[p] for p in params]
        self._steps = [s["step"] for s in state]
        self._calls = [
            (
                [params[i] for i in indices],
                [state[i]["exp_avg"] for i in indices],
                [state[i]["exp_avg_sq"] for i in indices],
                [state[i]["step"] for i in indices],
                weight_decay,
            )
            for indices, weight_decay in self.prior_gradient.weight_decays(
                self.optimizer.param_groups[0]
            )
        ]


def _direct_kernel_reproduces(optimizer: torch.optim.Optimizer, params: list) -> bool:
    """A fused Adam with one group holding exactly ``params`` (one device and dtype),
    scalar hyperparameters, none of the options the call leaves out, and its state made."""
    if type(optimizer) is not torch.optim.Adam or not _one_group_of(optimizer, params):
        return False
    group = optimizer.param_groups[0]
    if not group.get("fused") or any(group.get(option) for option in _UNSUPPORTED):
        return False
    scalars = (group["lr"], group["eps"], *group["betas"])
    if any(isinstance(value, torch.Tensor) for value in scalars):
        return False
    if getattr(optimizer, "grad_scale", None) is not None:  # set by an AMP grad scaler
        return False
    if len({(p.device, p.dtype) for p in params}) != 1:
        return False
    return all(p in optimizer.state and "exp_avg" in optimizer.state[p] for p in params)


def _one_group_of(optimizer: torch.optim.Optimizer, params: list) -> bool:
    """Whether ``optimizer`` has a single parameter group holding exactly ``params``."""
    groups = optimizer.param_groups
    if len(groups) != 1 or len(groups[0]["params"]) != len(params):
        return False
    return all(p is q for p, q in zip(groups[0]["params"], params))
