"""Compression of traced models: equal to the masked model, smaller, or refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import spamkern as sk
from spamkern.models import resnet, vit
from spamkern.pruning import apply_masks, count_params, random_scores


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so a BN channel is only zero when γ = β = 0."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


@torch.no_grad()
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _masked_out(model, masks, x):
    return apply_masks(copy.deepcopy(model), masks).eval()(x)


CASES = {
    "resnet": lambda: _randomise_bn(resnet((3, 8, 8), 5, depth=6, widths=(4, 8)).double()),
    "vit": lambda: vit((3, 8, 8), 5, dim=16, depth=2, n_heads=4, patch=4).double(),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_compressed_equals_masked_and_is_smaller(name, s):
    torch.manual_seed(0)
    model = CASES[name]()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    masks = sk.prune(model, random_scores(model), s, pattern="unit", example_inputs=x)
    small = sk.compress(model, masks, example_inputs=x)
    probe = torch.randn(9, 3, 8, 8, dtype=torch.float64)  # not the tracing batch
    assert _rel(small.eval()(probe), _masked_out(model, masks, probe)) <= 1e-10
    assert count_params(small) < count_params(model)
    assert masks.sparsity() == pytest.approx(s, abs=0.02)


def test_coupled_producers_are_masked_together():
    torch.manual_seed(0)
    model = CASES["resnet"]()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit", example_inputs=x)
    gone = ~masks["stem.0.weight"].reshape(4, -1).any(dim=1)
    assert gone.any()
    for p in ["stem.1.weight", "stem.1.bias", "stages.0.0.bn2.bias"]:
        assert torch.equal(~masks[p], gone)
    assert torch.equal(~masks["stages.0.0.conv2.weight"].reshape(4, -1).any(dim=1), gone)
    small = sk.compress(model, masks, example_inputs=x)
    assert small.stem[0].out_channels == int((~gone).sum())
    assert small.stages[0][0].conv1.in_channels == int((~gone).sum())


def test_heads_are_removed_whole():
    torch.manual_seed(0)
    model = CASES["vit"]()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    scores = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for proj in "qkv":  # head 1 of block 0 is by far the least salient
        scores[f"blocks.0.attn.{proj}.weight"][4:8] = 1e-6
        scores[f"blocks.0.attn.{proj}.bias"][4:8] = 1e-6
    masks = sk.prune(model, scores, 0.01, pattern="unit", example_inputs=x)
    small = sk.compress(model, masks, example_inputs=x)
    attn = small.blocks[0].attn
    assert attn.n_heads == 3 and attn.q.out_features == 12 and attn.proj.in_features == 12
    kept = torch.cat([torch.arange(4), torch.arange(8, 16)])
    torch.testing.assert_close(attn.v.weight, model.blocks[0].attn.v.weight[kept])


def test_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    model = CASES["resnet"]()
    model.fc.weight.requires_grad_(False)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit", example_inputs=x)
    small = sk.compress(model, masks, example_inputs=x)
    assert not small.fc.weight.requires_grad and small.stem[0].weight.requires_grad


class SkipSequential(nn.Sequential):
    """A Sequential whose forward adds a skip connection around its middle layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self[0](x))
        h = h + torch.relu(self[1](h))
        return self[2](h)


def _skip_model() -> SkipSequential:
    torch.manual_seed(0)
    return SkipSequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)).double()


def test_sequential_with_skip_is_traced_not_shrunk_as_a_chain():
    model = _skip_model()
    chain_masks = sk.prune(model, random_scores(model), 0.5, pattern="unit")
    with pytest.raises(ValueError, match="remove only part of unit"):
        sk.compress(model, chain_masks)  # rows 0 and 1 are tied by the skip
    x = torch.randn(5, 6, dtype=torch.float64)
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit", example_inputs=x)
    for small in (sk.compress(model, masks), sk.compress(model, masks, example_inputs=x)):
        assert small[0].out_features == small[1].out_features == 4
        assert _rel(small(x), _masked_out(model, masks, x)) <= 1e-10


def test_skip_to_the_input_and_constant_offsets_are_refused():
    class InputSkip(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[1](x + torch.relu(self[0](x)))

    torch.manual_seed(0)
    model = InputSkip(nn.Linear(4, 4), nn.Linear(4, 2))
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit")
    with pytest.raises(ValueError, match="outside the traced graph"):
        sk.compress(model, masks)


def test_probe_check_refuses_what_tracing_cannot_see():
    class Centred(nn.Module):
        """Channels centred across channels: TP sees an element-wise op, zeros move."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h - h.mean(dim=1, keepdim=True))

    torch.manual_seed(0)
    model = Centred()
    x = torch.randn(5, 4)
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit", example_inputs=x)
    with pytest.raises(ValueError, match="differs from the masked model"):
        sk.compress(model, masks, example_inputs=x)


def test_untraceable_model_is_refused_by_prune_and_compress():
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).detach())

    model = Detached()
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="no prunable coupled channel group"):
        sk.prune(model, random_scores(model), 0.5, pattern="unit", example_inputs=x)
    masks = {"a.weight": torch.ones(4, 4, dtype=torch.bool), "a.bias": torch.ones(4).bool()}
    masks["a.weight"][1] = masks["a.bias"][1] = False
    with pytest.raises(ValueError, match=r"produce no coupled group.*\['a.bias', 'a.weight'\]"):
        sk.compress(model, masks, example_inputs=x)


def test_models_without_a_known_input_need_example_inputs():
    torch.manual_seed(0)
    model = CASES["resnet"]()
    masks = sk.prune(
        model, random_scores(model), 0.5, pattern="unit",
        example_inputs=torch.randn(2, 3, 8, 8, dtype=torch.float64),
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs example_inputs.*it is a ResNet"):
        sk.compress(model, masks)
