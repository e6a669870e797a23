"""Metrics and fine-tuning: logits, NaN, out-of-range labels, empty or one-shot data refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spamkern.metrics import accuracy, brier, ece, glm_predictive, map_predictive, nll
from spamkern.pruning.finetune import finetune

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
LABELS = torch.tensor([0, 2])


@pytest.mark.parametrize("metric", [accuracy, nll, ece, brier])
@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, 0.6]]), LABELS, "not logits"),
        (torch.tensor([[0.7, 0.2, 0.2], [0.1, 0.3, 0.6]]), LABELS, "rows summing to 1"),
        (torch.tensor([[math.nan, 0.2, 0.1], [0.1, 0.3, 0.6]]), LABELS, "NaN or Inf"),
        (PROBS, torch.tensor([0, 3]), r"labels must lie in \[0, 2\]"),
        (PROBS, torch.tensor([-1, 2]), r"labels must lie in \[0, 2\]"),
        (PROBS[:0], LABELS[:0], "probs is empty"),
    ],
)
def test_metrics_refuse_what_would_give_a_silent_wrong_number(metric, probs, labels, message):
    with pytest.raises(ValueError, match=message):
        metric(probs, labels)


def test_ece_refuses_fractional_bins():
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        ece(PROBS, LABELS, n_bins=2.5)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_predictives_refuse_empty_inputs_and_bad_batch_sizes():
    model = _mlp()
    with pytest.raises(ValueError, match="at least one input row"):
        map_predictive(model, torch.randn(0, 4))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        map_predictive(model, torch.randn(3, 4), batch_size=0)

    class Posterior:
        def __init__(self):
            self.model = model

        def functional_variance(self, J):
            return J @ J.transpose(1, 2)

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        glm_predictive(Posterior(), torch.randn(3, 4), batch_size=1.5)


def _data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_finetune_refuses_a_generator_for_several_epochs():
    X, y = _data()
    gen = ((X[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5))
    with pytest.raises(TypeError, match="one-shot iterator"):
        finetune(_mlp(), gen, None, epochs=3, progress=False)


def test_finetune_runs_a_generator_for_one_epoch():
    X, y = _data()
    gen = ((X[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5))
    (loss,) = finetune(_mlp(), gen, None, epochs=1, progress=False)
    assert loss > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"data": []}, ValueError, "yielded no samples in epoch 1"),
        ({"data": (torch.randn(0, 4), torch.zeros(0, dtype=torch.long))}, ValueError, "no samples"),
        ({"lr": math.inf}, ValueError, "lr must be > 0 and finite"),
        ({"lr": 0.0}, ValueError, "lr must be > 0 and finite"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"batch_size": 2.5}, ValueError, "batch_size must be a positive integer"),
        ({"weight_decay": math.nan}, ValueError, "weight_decay must be a finite number >= 0"),
        (
            {"data": (torch.full((4, 4), math.nan), torch.zeros(4, dtype=torch.long))},
            ValueError,
            "loss became nan",
        ),
    ],
)
def test_finetune_bad_inputs(kwargs, error, message):
    kwargs = {"data": _data(), **kwargs}
    with pytest.raises(error, match=message):
        finetune(_mlp(), kwargs.pop("data"), None, epochs=2, progress=False, **kwargs)


class OneLogit(nn.Module):
    """A binary classifier returning one logit per sample, shape (batch,)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


def test_predictives_refuse_outputs_that_are_not_batch_by_classes():
    x = torch.randn(6, 4)
    with pytest.raises(
        ValueError, match=r"must return \(batch, classes\) scores, got shape \(6,\)"
    ):
        map_predictive(OneLogit(), x)  # softmax over the batch would sum to 1 across samples

    class Posterior:
        model = OneLogit()

        def functional_variance(self, J):
            return J @ J.transpose(1, 2)

    with pytest.raises(ValueError, match=r"must return \(batch, classes\) scores"):
        glm_predictive(Posterior(), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finetune_refuses_half_precision_parameters_with_the_reason(dtype):
    X, y = _data()
    with pytest.raises(TypeError, match=f"finetune needs float32 or float64.*{dtype}.*autocast"):
        finetune(_mlp().to(dtype), (X.to(dtype), y), None, epochs=2, progress=False)


def test_finetune_under_autocast_keeps_float32_parameters_and_learns():
    X, y = _data(64)
    model = _mlp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = finetune(model, (X, y), None, epochs=5, lr=1e-2, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]


def test_finetune_refuses_a_model_without_trainable_parameters():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        finetune(model, _data(), None, epochs=1, progress=False)
