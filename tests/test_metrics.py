"""Metrics against hand-computed values; the GLM predictive against a direct Jacobian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from spamkern.metrics import (
    accuracy,
    brier,
    classification_metrics,
    ece,
    glm_predictive,
    map_predictive,
    nll,
)

PROBS = torch.tensor([[0.85, 0.15], [0.35, 0.65], [0.55, 0.45], [0.25, 0.75], [0.42, 0.58]])
LABELS = torch.tensor([0, 0, 1, 1, 1])


def test_hand_computed_values():
    # predictions 0, 1, 0, 1, 1 → correct: yes, no, no, yes, yes
    assert accuracy(PROBS, LABELS) == pytest.approx(3 / 5)
    expected_nll = (
        -(math.log(0.85) + math.log(0.35) + math.log(0.45) + math.log(0.75) + math.log(0.58)) / 5
    )
    assert nll(PROBS, LABELS) == pytest.approx(expected_nll)
    # confidences 0.85 (bin 8, right), 0.65 (bin 6, wrong), 0.55 (bin 5, wrong),
    # 0.75 (bin 7, right), 0.58 (bin 5, right): bin 5 holds 0.55 (wrong) and 0.58 (right)
    expected_ece = (
        abs(1 - 0.85) + abs(0 - 0.65) + 2 * abs(0.5 - (0.55 + 0.58) / 2) + abs(1 - 0.75)
    ) / 5
    assert ece(PROBS, LABELS) == pytest.approx(expected_ece)
    expected_brier = (2 * 0.15**2 + 2 * 0.65**2 + 2 * 0.55**2 + 2 * 0.25**2 + 2 * 0.42**2) / 5
    assert brier(PROBS, LABELS) == pytest.approx(expected_brier)


def _ece_loop(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 10) -> float:
    total = 0.0
    conf, pred = probs.max(1)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = [i for i in range(len(y)) if lo < float(conf[i]) <= hi]
        if sel:
            acc = sum(float(pred[i] == y[i]) for i in sel) / len(sel)
            mean_conf = sum(float(conf[i]) for i in sel) / len(sel)
            total += len(sel) / len(y) * abs(acc - mean_conf)
    return total


def test_random_inputs_against_loops():
    g = torch.Generator().manual_seed(0)
    probs = (torch.rand(97, 7, generator=g, dtype=torch.float64) * 6).softmax(1)
    y = torch.randint(0, 7, (97,), generator=g)
    assert ece(probs, y) == pytest.approx(_ece_loop(probs, y), abs=1e-12)
    brier_loop = (
        sum(
            sum((float(probs[i, c]) - float(c == int(y[i]))) ** 2 for c in range(7))
            for i in range(97)
        )
        / 97
    )
    assert brier(probs, y) == pytest.approx(brier_loop)
    m = classification_metrics(probs, y)
    assert set(m) == {"accuracy", "nll", "ece", "brier"}


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        accuracy(torch.rand(5), LABELS)
    with pytest.raises(ValueError, match="labels"):
        nll(PROBS, LABELS[:3])
    with pytest.raises(TypeError, match="integer"):
        brier(PROBS, LABELS.float())
    with pytest.raises(ValueError, match="n_bins"):
        ece(PROBS, LABELS, n_bins=0)


class _Posterior:
    def __init__(self, model: nn.Module, variances: torch.Tensor) -> None:
        self.model = model
        self.named_params = list(model.named_parameters())
        self.variances = variances

    def functional_variance(self, J: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bcp,p,bdp->bcd", J, self.variances, J)


def test_map_and_glm_predictive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(map_predictive(model, x, batch_size=4), model(x).softmax(-1))

    n = sum(p.numel() for p in model.parameters())
    var = torch.rand(n, dtype=torch.float64)
    post = _Posterior(model, var)
    names = [k for k, _ in model.named_parameters()]
    expected = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda *ps, xi=xi: functional_call(model, dict(zip(names, ps)), (xi[None],))[0],
            tuple(p.detach() for p in model.parameters()),
        )
        J = torch.cat([j.reshape(4, -1) for j in jac], 1)
        f = model(xi[None])[0].detach()
        fvar = (J * var) @ J.T
        expected.append((f / torch.sqrt(1 + math.pi / 8 * fvar.diagonal())).softmax(-1))
    got = glm_predictive(post, x, batch_size=4)
    torch.testing.assert_close(got, torch.stack(expected))
    assert model.training  # state restored
    with pytest.raises(ValueError, match="probit"):
        glm_predictive(post, x, link="mc")
    with pytest.raises(TypeError, match="functional_variance"):
        glm_predictive(object(), x)


def test_glm_predictive_with_a_fitted_diag_posterior():
    import spamkern as sk

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(23, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    post = sk.fit_laplace(model, (x, y), structure="diag", prior_precision=0.5, progress=False)
    variances = 1.0 / post.precision_diag().detach()
    expected = glm_predictive(_Posterior(model, variances), x)
    torch.testing.assert_close(glm_predictive(post, x), expected, rtol=1e-10, atol=1e-12)
