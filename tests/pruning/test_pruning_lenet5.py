"""LeNet-5 on 28×28 digits: where OPD's diagonal fails, measured against the full Kronecker cost.

fc1 follows conv + ReLU + max-pool, so its inputs are all ≥ 0 with a large mean and its
Kronecker factor A = E[a aᵀ] is dominated by the mean part. Removing many same-sign weights
of one row then costs far more than the sum of their diagonal terms: the second-order
increase of the negative log joint for a removal Δ = −W∘(1−M) is

    c(M) = ½ vec(Δ)ᵀ Π vec(Δ) = ½ s·tr(G Δ A Δᵀ) + ½ Σ δ Δ²,

of which OPD keeps only Σ_removed ½ W² (s G_ii A_jj + δ).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import spamkern as sk
from spamkern.models import lenet5
from spamkern.pruning import apply_masks, opd_scores, prune

EPOCHS = 6
FC1 = "7.weight"


def test_lenet5_layers_and_shapes():
    model = lenet5((1, 28, 28), 10)
    kinds = [type(m).__name__ for m in model]
    assert kinds == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
        "Linear", "ReLU", "Linear", "ReLU", "Linear",
    ]  # fmt: skip
    widths = [
        (m.in_channels, m.out_channels, m.kernel_size) for m in model if hasattr(m, "in_channels")
    ]
    assert widths == [(1, 6, (5, 5)), (6, 16, (5, 5))]
    linears = [(m.in_features, m.out_features) for m in model if isinstance(m, torch.nn.Linear)]
    assert linears == [(16 * 4 * 4, 120), (120, 84), (84, 10)]  # 28 → 24 → 12 → 8 → 4
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # other sizes and channel counts: fc1's width follows the input
    wide = lenet5((3, 32, 32), 7)
    assert wide[7].in_features == 16 * 5 * 5 and wide(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="too small for LeNet-5"):
        lenet5((1, 15, 15))
    with pytest.raises(ValueError, match=r"input shape \(C, H, W\)"):
        lenet5((784,))


@pytest.fixture(scope="module")
def trained():
    """MAP and SpaM (unitwise prior, KFAC) LeNet-5s on digits28 from one initialisation."""
    torch.set_num_threads(1)
    split = sk.load_dataset("digits28", seed=0)
    torch.manual_seed(0)
    init = lenet5((1, 28, 28), 10)
    common = dict(n_epochs=EPOCHS, lr=1e-3, batch_size=64, progress=False, seed=0)
    spam = sk.marglik_train(
        copy.deepcopy(init),
        split.train,
        prior="unitwise",
        n_epochs_burnin=2,
        marglik_frequency=2,
        n_hypersteps=30,
        **common,
    )
    mapm = sk.marglik_train(
        copy.deepcopy(init),
        split.train,
        prior="scalar",
        n_epochs_burnin=EPOCHS + 1,
        n_hypersteps=0,
        **common,
    )
    return split, spam, mapm


def _block(post, name: str):
    """(W, G, A, δ as W's shape) of one Kronecker weight block, all float64."""
    names = [n for n, _ in post.named_params]
    i = names.index(name)
    offset = sum(p.numel() for _, p in post.named_params[:i])
    w = post.named_params[i][1].detach().double()
    g, a = (f.double() for f in post.kron_factors[i])
    delta = post.prior.precision_diag().detach()[offset : offset + w.numel()].view_as(w).double()
    return w, g, a, delta


def _costs(post, name: str, keep: torch.Tensor) -> tuple[float, float]:
    """(full Kronecker cost, OPD's diagonal cost) of removing ``~keep`` from block ``name``."""
    w, g, a, delta = _block(post, name)
    s = post.curvature_scale
    d = -w * (~keep)
    full = 0.5 * s * torch.trace(g @ d @ a @ d.T) + 0.5 * (delta * d.square()).sum()
    diag = (0.5 * w.square() * (s * torch.outer(g.diagonal(), a.diagonal()) + delta))[~keep]
    return float(full), float(diag.sum())


def _neg_log_joint(model, post, data) -> float:
    """Σ cross-entropy over the training set + ½ Σ δ θ² (the objective at θ*)."""
    x, y = data
    with torch.no_grad():
        loss = F.cross_entropy(model(x).double(), y, reduction="sum")
        theta = torch.cat([p.detach().reshape(-1) for _, p in post.named_params]).double()
        prior = 0.5 * (post.prior.precision_diag().detach().double() * theta.square()).sum()
    return float(loss / post.temperature + prior)


def test_kronecker_cost_is_the_dense_quadratic_form(trained):
    """The trace form equals vec(Δ)ᵀ (s G⊗A + diag δ) vec(Δ) (row-major vec), built densely."""
    _, spam, _ = trained
    post = spam.posterior
    w, g, a, delta = _block(post, FC1)
    rows = 6  # a sub-block of rows keeps the dense (rows·256)² matrix small
    keep = opd_scores(post, as_dict=True)[FC1][:rows] > 0  # any mask with both kinds
    keep[:, ::3] = False
    d = -w[:rows] * (~keep)
    dense = post.curvature_scale * torch.kron(g[:rows, :rows], a) + torch.diag(
        delta[:rows].reshape(-1)
    )
    expected = 0.5 * d.reshape(-1) @ dense @ d.reshape(-1)
    s = post.curvature_scale
    trace = 0.5 * s * torch.trace(g[:rows, :rows] @ d @ a @ d.T) + 0.5 * (delta[:rows] * d**2).sum()
    torch.testing.assert_close(trace, expected, rtol=1e-10, atol=0)


def test_opd_diagonal_underestimates_fc1_cost(trained):
    """OPD's own 80 % mask: its diagonal misses most of the cost the full form predicts,
    and the full form is the one that matches the measured increase of the objective."""
    split, spam, _ = trained
    post = spam.posterior
    masks = prune(spam.model, opd_scores(post), 0.8)
    keep = masks[FC1]
    assert 0.5 < float((~keep).float().mean()) < 1.0  # fc1 really is pruned hard
    full, diag = _costs(post, FC1, keep)
    assert full > 3.0 * diag, (full, diag)

    # measured: zero only fc1's removed weights and evaluate the objective on the train set
    pruned = copy.deepcopy(spam.model)
    with torch.no_grad():
        pruned[7].weight.mul_(keep)
    base = _neg_log_joint(spam.model, post, split.train)
    actual = _neg_log_joint(pruned, post, split.train) - base
    assert actual > 3.0 * diag, (actual, diag)
    assert abs(full - actual) < abs(diag - actual), (full, diag, actual)


def _accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def test_opd_loses_to_magnitude_at_80_percent(trained):
    """The failure on held-out data: SpaM+OPD below MAP+magnitude at 80 % unstructured."""
    split, spam, mapm = trained
    opd = prune(spam.model, opd_scores(spam.posterior), 0.8)
    mag = prune(mapm.model, sk.magnitude_scores(mapm.model), 0.8)
    acc_opd = _accuracy(apply_masks(copy.deepcopy(spam.model), opd), split.test)
    acc_mag = _accuracy(apply_masks(copy.deepcopy(mapm.model), mag), split.test)
    assert acc_mag > acc_opd + 0.05, (acc_opd, acc_mag)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.9), ("unit", 0.6)])
def test_sparsify_default_fixes_it(trained, pattern, sparsity):
    """sk.sparsify's default on the SpaM model (reconstructed on the training inputs) keeps
    far more held-out accuracy than SpaM+OPD and than MAP+magnitude, both unreconstructed."""
    split, spam, mapm = trained
    dense = _accuracy(spam.model, split.test)
    result = sk.sparsify(spam.model, spam.posterior, sparsity, pattern=pattern, data=split.train)
    assert result.method in sk.SPARSIFY_METHODS and result.reconstruct == "data"
    assert abs(result.masks.sparsity() - sparsity) < 0.05
    ours = _accuracy(result.model, split.test)
    opd = prune(spam.model, opd_scores(spam.posterior), sparsity, pattern=pattern)
    mag = prune(mapm.model, sk.magnitude_scores(mapm.model), sparsity, pattern=pattern)
    acc_opd = _accuracy(apply_masks(copy.deepcopy(spam.model), opd), split.test)
    acc_mag = _accuracy(apply_masks(copy.deepcopy(mapm.model), mag), split.test)
    assert ours > acc_opd + 0.10, (ours, acc_opd)
    assert ours > acc_mag + 0.05, (ours, acc_mag)
    assert ours > dense - 0.10, (ours, dense)
