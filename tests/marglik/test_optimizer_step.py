"""The optimiser step that calls torch's fused Adam kernel directly: bit for bit the
optimiser's own ``step`` after the prior's gradient, for every kind of prior, with a
changing learning rate, and the plain path wherever the direct call would differ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spamkern.marglik.optimizer_step import OptimizerStep, PriorGradient, make_optimizer
from spamkern.prior.priors import make_prior

N_DATA, TEMPERATURE = 200, 0.7


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _prior(model: nn.Module, kind: str):
    prior = make_prior(kind, list(model.named_parameters()))
    with torch.no_grad():  # distinct δ everywhere (per tensor, per unit, per entry)
        g = torch.Generator().manual_seed(5)
        prior.log_precision.copy_(torch.randn(prior.log_precision.shape, generator=g))
    return prior


def _train(kind: str, direct: bool, optimizer: str = "adam", **adam_options):
    """Ten steps over a cosine learning rate; ``direct`` steps through OptimizerStep,
    otherwise the prior gradient then ``optimizer.step()``."""
    model = _model()
    params = list(model.parameters())
    opt = make_optimizer(params, optimizer, 0.05, 0.9)
    for key, value in adam_options.items():
        opt.param_groups[0][key] = value
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    prior_gradient = PriorGradient(params, _prior(model, kind), TEMPERATURE, N_DATA, opt)
    step = OptimizerStep(prior_gradient, opt)
    g = torch.Generator().manual_seed(1)
    used_kernel = []
    for k in range(10):
        if k % 4 == 0:  # a new epoch: the prior is read again
            step.refresh()
        opt.zero_grad(set_to_none=True)
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        if direct:
            used_kernel.append(step._calls is not None)
            step()
        else:
            prior_gradient()
            opt.step()
        sched.step()
    keys = [
        key
        for key in ("exp_avg", "exp_avg_sq", "step", "momentum_buffer")
        if key in opt.state[params[0]]
    ]
    state = [opt.state[p][key] for p in params for key in keys]
    return params, state, used_kernel


@pytest.mark.parametrize("kind", ["scalar", "layerwise", "unitwise", "parameterwise"])
def test_direct_kernel_call_is_bit_for_bit_the_optimiser_step(kind):
    reference, reference_state, _ = _train(kind, direct=False)
    params, state, used_kernel = _train(kind, direct=True)
    # the first step of each epoch goes through optimizer.step(), every other the kernel
    assert used_kernel == [False, True, True, True] * 2 + [False, True]
    for a, b in zip(params + state, reference + reference_state):
        assert torch.equal(a, b)


def test_a_shared_delta_is_one_kernel_call_with_the_groups_weight_decay():
    model = _model()
    params = list(model.parameters())
    opt = make_optimizer(params, "adam", 0.05, 0.9)
    prior = make_prior("layerwise", list(model.named_parameters()), 2.0)
    prior_gradient = PriorGradient(params, prior, 1.0, N_DATA, opt)
    prior_gradient.refresh()
    assert prior_gradient.weight_decays(opt.param_groups[0]) == [([0, 1, 2, 3], 2.0 / N_DATA)]


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("sgd", {}), ("adam", {"amsgrad": True}), ("adam", {"maximize": True})],
)
def test_options_the_kernel_call_leaves_out_take_the_optimisers_step(optimizer, options):
    reference, reference_state, _ = _train("layerwise", False, optimizer, **options)
    params, state, used_kernel = _train("layerwise", True, optimizer, **options)
    assert not any(used_kernel)
    for a, b in zip(params + state, reference + reference_state):
        assert torch.equal(a, b)
