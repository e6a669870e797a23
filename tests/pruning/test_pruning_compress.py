"""Compression: the smaller model computes what the masked model computes, and is smaller."""

from __future__ import annotations

import copy

import pytest
import torch
from pruning_helpers import make_cnn, make_mlp, n_params
from torch import nn

from spamkern.pruning import apply_masks, compress, count_flops, prune, random_scores


def _masked(model: nn.Module, masks) -> nn.Module:
    return apply_masks(copy.deepcopy(model), masks)


@pytest.mark.parametrize("s", [0.3, 0.75, 0.99])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_unit_compression_matches_masked_mlp(s, scope):
    model = make_mlp()
    masks = prune(model, random_scores(model, torch.Generator().manual_seed(1)), s, "unit", scope)
    small = compress(model, masks)
    x = torch.randn(17, 7, dtype=torch.float64)
    torch.testing.assert_close(small(x), _masked(model, masks)(x), rtol=0, atol=1e-6)
    k0, k1 = int(masks["0.bias"].sum()), int(masks["2.bias"].sum())
    assert (small[0].out_features, small[2].in_features, small[2].out_features) == (k0, k0, k1)
    assert small[4].in_features == k1 and small[4].out_features == 3
    assert n_params(small) < n_params(model)
    assert n_params(model) == 7 * 13 + 13 + 13 * 11 + 11 + 11 * 3 + 3  # original untouched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_compression_matches_masked_cnn(seed):
    model = make_cnn(seed=seed)
    scores = random_scores(model, torch.Generator().manual_seed(seed))
    masks = prune(model, scores, 0.6, pattern="unit", scope="layerwise")
    small = compress(model, masks)
    x = torch.randn(11, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(small(x), _masked(model, masks)(x), rtol=0, atol=1e-6)
    c0, c1 = int(masks["0.bias"].sum()), int(masks["3.bias"].sum())
    assert small[0].out_channels == c0 and small[3].in_channels == c0
    assert small[3].out_channels == c1 and small[6].in_features == c1 * 9
    assert n_params(small) < n_params(model)
    assert count_flops(small, (2, 6, 6)) < count_flops(model, (2, 6, 6))


def test_nested_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(5, 9), nn.ReLU()),
        nn.Sequential(nn.Linear(9, 7), nn.SiLU(), nn.Dropout(0.1)),
        nn.Linear(7, 2),
    ).double()
    masks = prune(model, random_scores(model), 0.5, pattern="unit")
    small = compress(model, masks).eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(small(x), _masked(model, masks).eval()(x), rtol=0, atol=1e-6)
    assert small[1][0].in_features == int(masks["0.0.bias"].sum())


def test_count_flops_by_hand():
    model = make_mlp()
    assert count_flops(model, (7,)) == 2 * (7 * 13 + 13 * 11 + 11 * 3)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert count_flops(conv, (2, 6, 6)) == 2 * (3 * 4 * 4 * 2 * 9 + 48 * 5)


def test_unstructured_compress_is_masked_copy():
    model = make_mlp()
    masks = prune(model, random_scores(model), 0.8)
    out = compress(model, masks)
    for (n, p), (_, q) in zip(model.named_parameters(), out.named_parameters()):
        m = masks.get(n, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(q, p.detach() * m)


def test_block_compress_uses_block_sparse_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    masks = prune(model, random_scores(model), 0.5, pattern="block", block=(16, 16))
    out = compress(model, masks)
    assert type(out[0]).__name__ == "BlockSparseLinear"
    x = torch.randn(5, 64)
    torch.testing.assert_close(out(x), _masked(model, masks)(x), rtol=1e-5, atol=1e-5)


def test_errors_name_the_module():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    masks = prune(bn, random_scores(bn), 0.5, pattern="unit")
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        compress(bn, masks)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x + self.a(x))

    res = Residual()  # traced: a's channels are added to the model's input
    with pytest.raises(ValueError, match="no prunable coupled channel group"):
        prune(res, random_scores(res), 0.5, pattern="unit")
    masks = {"a.weight": torch.ones(4, 4, dtype=torch.bool)}
    masks["a.weight"][2] = False
    with pytest.raises(ValueError, match="rooted at 'a', which cannot go exactly"):
        compress(res, masks)

    mlp = make_mlp()
    unstructured = prune(mlp, random_scores(mlp), 0.5)
    with pytest.raises(ValueError, match="not a unit mask"):
        compress(mlp, unstructured, pattern="unit")
    out_masks = prune(mlp, random_scores(mlp), 0.5, pattern="unit", prune_output_layer=True)
    with pytest.raises(ValueError, match="last layer '4'"):
        compress(mlp, out_masks)


def test_two_four_compress_uses_semi_structured_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    masks = prune(model, random_scores(model), 0.5, pattern="2:4")
    out = compress(model, masks)
    assert type(out[0]).__name__ == "SemiStructuredLinear" and isinstance(out[2], nn.Linear)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(out(x), _masked(model, masks)(x), rtol=0, atol=1e-12)


def test_compression_report_before_and_after():
    from spamkern.pruning import compression_report, count_params

    model = make_cnn()
    masks = prune(model, random_scores(model), 0.5, pattern="unit")
    small = compress(model, masks)
    threads = torch.get_num_threads()
    rep = compression_report(model, small, (2, 6, 6), batch_size=8, repeats=2)
    assert rep["params_before"] == count_params(model) > rep["params_after"] == count_params(small)
    assert rep["flops_before"] == count_flops(model, (2, 6, 6)) > rep["flops_after"]
    assert rep["latency_ms_before"] > 0 and rep["latency_ms_after"] > 0
    assert torch.get_num_threads() == threads  # the 1-thread timing setting is undone
