"""End to end: SpaM (unitwise prior) → OPD unit pruning of coupled groups → compress."""

from __future__ import annotations

import copy

import pytest
import torch

import spamkern as sk
from spamkern.models import resnet, vit
from spamkern.pruning import apply_masks, count_params

MODELS = {
    "resnet": lambda: resnet((3, 8, 8), 3, depth=6, widths=(4, 8)),
    "vit": lambda: vit((3, 8, 8), 3, dim=8, depth=1, n_heads=2, patch=4),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spam_opd_prune_compress(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    result = sk.marglik_train(
        model, (x, y), n_epochs=1, prior="unitwise", n_hypersteps=3, batch_size=32,
        progress=False,
    )  # fmt: skip
    masks = sk.prune(model, result.posterior, 0.5, pattern="unit", example_inputs=x[:4])
    small = sk.compress(model, masks, example_inputs=x[:4])
    masked = apply_masks(copy.deepcopy(model), masks).eval()
    with torch.no_grad():
        probe = torch.randn(8, 3, 8, 8, dtype=torch.float64)
        want, got = masked(probe), small.eval()(probe)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert count_params(small) < 0.8 * count_params(model)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.05)
