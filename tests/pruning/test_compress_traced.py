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
@pytest.mark.parametrize("s", [0.25, 0.75])
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
    # rows of layers 0 and 1 are tied by the skip: masking only layer 1's is refused
    chain_masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    chain_masks["1.weight"][[1, 5]] = False
    chain_masks["1.bias"][[1, 5]] = False
    with pytest.raises(ValueError, match="remove only part of unit"):
        sk.compress(model, chain_masks)
    x = torch.randn(5, 6, dtype=torch.float64)
    scores = random_scores(model)
    traced = sk.prune(model, scores, 0.5, pattern="unit")  # Linear-first: traced too
    masks = sk.prune(model, scores, 0.5, pattern="unit", example_inputs=x)
    assert all(torch.equal(traced[n], masks[n]) for n in masks)
    for small in (sk.compress(model, masks), sk.compress(model, masks, example_inputs=x)):
        assert small[0].out_features == small[1].out_features == 4
        assert _rel(small(x), _masked_out(model, masks, x)) <= 1e-10


def test_skip_to_the_input_and_constant_offsets_are_refused():
    class InputSkip(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[1](x + torch.relu(self[0](x)))

    torch.manual_seed(0)
    model = InputSkip(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no prunable coupled channel group"):
        sk.prune(model, random_scores(model), 0.5, pattern="unit")
    masks = {"0.weight": torch.ones(4, 4, dtype=torch.bool)}
    masks["0.weight"][3] = False
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
    scores = random_scores(model)
    masks = sk.prune(model, scores, 0.5, pattern="unit")  # input_shape known
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    traced = sk.prune(model, scores, 0.5, pattern="unit", example_inputs=x)
    assert all(torch.equal(traced[n], masks[n]) for n in masks)
    sk.compress(model, masks)
    del model.input_shape
    with pytest.raises(ValueError, match="needs example_inputs.*it is a ResNet"):
        sk.compress(model, masks)


def test_token_transformer_is_traced_on_its_own_token_ids():
    torch.manual_seed(0)
    model = vit((12,), 4, dim=8, depth=1, n_heads=2, vocab_size=30).double()
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit", scope="layerwise")
    small = sk.compress(model, masks)
    tokens = torch.randint(0, 30, (5, 12))
    assert _rel(small.eval()(tokens), _masked_out(model, masks, tokens)) <= 1e-10
    assert small.blocks[0].attn.n_heads == 1 and small.blocks[0].mlp[0].out_features == 8


def test_model_constructors_check_their_arguments():
    model = resnet((3, 32, 32), 10)  # ResNet-20: 3 stages of 3 blocks
    assert len(model.stages) == 3 and all(len(s) == 3 for s in model.stages)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="2 \\+ 6·n"):
        resnet((3, 32, 32), 10, depth=21)
    with pytest.raises(ValueError, match="patch 4 does not divide"):
        vit((3, 30, 30), 10)
    with pytest.raises(ValueError, match="vocab_size"):
        vit((12,), 10)
    with pytest.raises(ValueError, match="dim 10 is not divisible by n_heads 4"):
        vit((3, 8, 8), 10, dim=10)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_traced_units_of_a_plain_chain_are_its_layer_units(scope):
    """On a plain Sequential, coupled groups are the layers' own units: same masks."""
    from spamkern.models import lenet

    torch.manual_seed(0)
    model = lenet((1, 8, 8)).double()
    scores = random_scores(model)
    plain = sk.prune(model, scores, 0.4, pattern="unit", scope=scope)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    traced = sk.prune(model, scores, 0.4, pattern="unit", scope=scope, example_inputs=x)
    assert plain.keys() == traced.keys()
    assert all(torch.equal(plain[n], traced[n]) for n in plain)
    assert traced.sparsity() == pytest.approx(plain.sparsity())


class ConcatDepthwise(nn.Module):
    """Two convs concatenated into one BatchNorm, then a conv and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.dw = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        h = torch.relu(self.dw(torch.relu(self.c(h))))
        return self.fc(h.mean((2, 3)))


def test_concatenation_and_depthwise_convolution():
    torch.manual_seed(0)
    model = _randomise_bn(ConcatDepthwise().double())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit", example_inputs=x)
    gone_b = ~masks["b.weight"].reshape(6, -1).any(dim=1)
    assert torch.equal(~masks["bn.weight"][4:], gone_b)  # b's channels sit at 4..9 of bn
    assert torch.equal(~masks["dw.weight"].reshape(5, -1).any(dim=1), ~masks["c.bias"])
    small = sk.compress(model, masks, example_inputs=x)
    kept_b = int((~gone_b).sum())
    assert small.b.out_channels == kept_b and small.bn.num_features == small.c.in_channels
    assert small.dw.groups == small.dw.out_channels == small.c.out_channels
    assert _rel(small.eval()(x), _masked_out(model, masks, x)) <= 1e-10


def test_multihead_attention_keeps_its_heads_and_loses_mlp_neurons():
    torch.manual_seed(0)
    model = vit((3, 8, 8), 3, dim=8, depth=1, n_heads=2, patch=4, attention="mha").double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    masks = sk.prune(model, random_scores(model), 0.5, pattern="unit", example_inputs=x)
    assert sorted(masks) == ["blocks.0.mlp.0.bias", "blocks.0.mlp.0.weight"]
    small = sk.compress(model, masks, example_inputs=x)
    assert isinstance(small.blocks[0].attn, nn.MultiheadAttention)
    assert small.blocks[0].attn.embed_dim == 8 and small.blocks[0].mlp[0].out_features == 8
    assert _rel(small.eval()(x), _masked_out(model, masks, x)) <= 1e-10
