"""BlockSparseLinear, its sparse-or-dense choice, model conversion and the 2:4 layer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import rel_err
from torch import nn

from spamkern.dispatch import select_backend
from spamkern.sparse import (
    BlockSparseLinear,
    SemiStructuredLinear,
    convert_to_block_sparse,
    is_2to4,
    tables,
)
from spamkern.sparse.decision import lookup, sparse_wins


def _pruned_linear(n, k, block, density, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        lin.bias.copy_(torch.randn(n, generator=gen))
    nb, kb = -(-n // block[0]), -(-k // block[1])
    bmask = torch.rand(nb, kb, generator=gen) < density
    elem = bmask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    return lin, bmask, elem


@pytest.mark.parametrize("mode", ["sparse", "dense", "auto"])
def test_layer_matches_masked_linear(mode):
    lin, bmask, elem = _pruned_linear(150, 100, (32, 16), 0.3, 1)
    layer = BlockSparseLinear.from_dense(lin, (32, 16), bmask, mode=mode)
    x = torch.randn(3, 5, 100)
    ref = F.linear(x.double(), (lin.weight * elem).double(), lin.bias.double())
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (3, 5, 150) and rel_err(y, ref) < 1e-5
    choice = layer.last_choice
    assert choice.path in ("sparse", "dense") and choice.reason
    if mode != "auto":
        assert choice.path == mode


def test_auto_measures_once_and_records_per_card():
    lin, bmask, _ = _pruned_linear(256, 256, (64, 64), 0.1, 2)
    layer = BlockSparseLinear.from_dense(lin, 64, bmask)
    x = torch.randn(64, 256)
    with torch.no_grad():
        layer(x)
    first = layer.last_choice
    assert "measured now" in first.reason and first.sparse_ms > 0 and first.dense_ms > 0
    assert first.path == ("sparse" if sparse_wins(first.sparse_ms, first.dense_ms) else "dense")
    card = tables.card_name(x.device)
    files = list(tables.cache_dir().glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["card"] == card
    # a fresh layer of the same shape reuses the record instead of measuring again
    again = BlockSparseLinear.from_dense(lin, 64, bmask)
    with torch.no_grad():
        again(x)
    assert "recorded" in again.last_choice.reason


@pytest.mark.parametrize("dense_faster", [True, False])
def test_recorded_timings_decide(dense_faster):
    lin, bmask, elem = _pruned_linear(128, 192, (64, 64), 0.5, 3)
    layer = BlockSparseLinear.from_dense(lin, 64, bmask)
    x = torch.randn(40, 192)
    card = tables.card_name(x.device)
    backend = select_backend("bsr_linear", x, layer.blocks_t)
    tables.record(
        card,
        timing={
            "op": "bsr_linear",
            "m": 32,
            "n": 128,
            "k": 192,
            "block": [64, 64],
            "density": layer.density + 0.01,
            "dtype": "float32",
            "sparse_ms": 2.0 if dense_faster else 1.0,
            "dense_ms": 1.0 if dense_faster else 2.0,
            "backend": backend,
        },
    )
    with torch.no_grad():
        y = layer(x)
    assert layer.last_choice.path == ("dense" if dense_faster else "sparse")
    assert "recorded" in layer.last_choice.reason
    ref = F.linear(x.double(), (lin.weight * elem).double(), lin.bias.double())
    assert rel_err(y, ref) < 1e-5
    # far-away shapes and densities do not match the record
    assert lookup(card, "bsr_linear", 4096, 128, 192, (64, 64), layer.density, x.dtype) is None
    assert lookup(card, "bsr_linear", 40, 128, 192, (64, 64), 0.9, x.dtype) is None


def test_measuring_off_says_so(monkeypatch):
    monkeypatch.setenv("SPAMKERN_SPARSE_MEASURE", "0")
    lin, bmask, _ = _pruned_linear(64, 64, (32, 32), 0.5, 4)
    layer = BlockSparseLinear.from_dense(lin, 32, bmask)
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert layer.last_choice.path == "sparse" and "measuring is off" in layer.last_choice.reason


def test_layer_casts_and_rejects_bad_input():
    lin, bmask, elem = _pruned_linear(64, 96, (16, 32), 0.5, 5)
    layer = BlockSparseLinear.from_dense(lin, (16, 32), bmask, mode="sparse").double()
    x = torch.randn(9, 96, dtype=torch.float64)
    ref = F.linear(x, (lin.weight * elem).double(), lin.bias.double())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)
    with pytest.raises(ValueError, match="expects 96"):
        layer(torch.randn(2, 95, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Linear"):
        BlockSparseLinear.from_dense(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="mode"):
        BlockSparseLinear.from_dense(lin, 16, mode="fast")


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(80, 96), nn.ReLU(), nn.Linear(96, 40))
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_convert_whole_model_matches_masked_model():
    torch.manual_seed(6)
    model = _MLP()
    gen = torch.Generator().manual_seed(6)
    masks = {
        "body.0.weight": torch.rand(96, 80, generator=gen) < 0.3,
        "body.2.weight": torch.rand(3, 6, generator=gen) < 0.5,  # block mask of (16, 16)
        "body.2.bias": torch.rand(40, generator=gen) < 0.5,
    }
    sparse = convert_to_block_sparse(model, masks, block=(16, 16), mode="sparse")
    assert isinstance(sparse.body[0], BlockSparseLinear)
    assert isinstance(sparse.body[2], BlockSparseLinear)
    assert isinstance(sparse.head, nn.Linear) and not isinstance(model.body[0], BlockSparseLinear)
    reference = _MLP()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.body[0].weight.mul_(masks["body.0.weight"])
        blocks = masks["body.2.weight"].repeat_interleave(16, 0).repeat_interleave(16, 1)
        reference.body[2].weight.mul_(blocks[:40, :96])
        reference.body[2].bias.mul_(masks["body.2.bias"])
        x = torch.randn(17, 80)
        torch.testing.assert_close(sparse(x), reference(x), rtol=1e-5, atol=1e-5)


def test_convert_rejects_unknown_and_non_linear_masks():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="Conv2d"):
        convert_to_block_sparse(model, {"0.weight": torch.ones(2, 1, 3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="names no parameter"):
        convert_to_block_sparse(model, {"5.weight": torch.ones(2, 8, dtype=torch.bool)})


def _mask_2to4(n, k, gen):
    scores = torch.rand(n, k // 4, 4, generator=gen)
    keep = scores.topk(2, dim=-1).indices
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)


def test_2to4_pattern_check():
    gen = torch.Generator().manual_seed(7)
    mask = _mask_2to4(8, 12, gen)
    assert is_2to4(mask)
    bad = mask.clone()
    bad[3, :4] = True
    assert not is_2to4(bad)
    assert not is_2to4(torch.zeros(4, 6, dtype=torch.bool))  # 6 inputs: not groups of 4


def test_2to4_layer_falls_back_to_dense_where_cusparselt_cannot_run():
    gen = torch.Generator().manual_seed(8)
    lin = nn.Linear(64, 24)
    mask = _mask_2to4(24, 64, gen)
    layer = SemiStructuredLinear.from_dense(lin, mask)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
    ref = F.linear(x.double(), (lin.weight * mask).double(), lin.bias.double())
    assert rel_err(y, ref) < 1e-5
    if not torch.cuda.is_available():
        assert layer.last_choice.path == "dense" and "fallback" in layer.last_choice.reason
    with pytest.raises(ValueError, match="2:4"):
        SemiStructuredLinear.from_dense(lin, torch.ones(24, 64, dtype=torch.bool))


@pytest.mark.gpu
def test_2to4_layer_on_gpu_matches_dense():
    gen = torch.Generator().manual_seed(9)
    lin = nn.Linear(512, 256).half().cuda()
    mask = _mask_2to4(256, 512, gen).cuda()
    layer = SemiStructuredLinear.from_dense(lin, mask, mode="sparse")
    x = torch.randn(128, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        y = layer(x)
    ref = F.linear(x.double(), (lin.weight * mask).double(), lin.bias.double())
    assert rel_err(y, ref) < 1e-2


def test_decide_picks_the_fastest_sparse_backend():
    import time

    from spamkern.sparse.decision import decide

    x = torch.randn(8, 32)
    kwargs = {"op": "toy", "x": x, "n": 16, "block": (16, 16), "density": 0.25}
    choice = decide(
        **kwargs,
        candidates={"slow": lambda: time.sleep(0.004), "fast": lambda: None},
        run_dense=lambda: time.sleep(0.002),
    )
    assert choice.path == "sparse" and choice.backend == "fast" and "measured now" in choice.reason
    # the records now exist for both backends: the next decision reads them
    again = decide(**kwargs, candidates={"slow": None, "fast": None}, run_dense=None)
    assert again.backend == "fast" and "recorded" in again.reason
    slow_only = decide(**kwargs, candidates={"slow": None}, run_dense=None)
    assert slow_only.path == "dense" and slow_only.sparse_ms > slow_only.dense_ms


def test_decide_drops_failing_and_wrong_candidates():
    from spamkern.sparse.decision import decide

    x = torch.randn(8, 32)
    ref = torch.randn(8, 16)

    def broken():
        raise RuntimeError("no kernel image for this card")

    kwargs = {"op": "toy2", "x": x, "n": 16, "block": (16, 16), "density": 0.25}
    choice = decide(
        **kwargs,
        candidates={"broken": broken, "wrong": lambda: ref + 1.0, "right": lambda: ref.clone()},
        run_dense=lambda: ref,
    )
    assert choice.backend in ("right", "dense")
    only_bad = decide(
        **{**kwargs, "op": "toy3"},
        candidates={"broken": broken, "wrong": lambda: ref * 1.5},
        run_dense=lambda: ref,
    )
    assert only_bad.path == "dense"
    assert "broken failed" in only_bad.reason and "wrong disagrees" in only_bad.reason
