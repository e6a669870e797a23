"""Coupled channel groups found by tracing (residual adds, BatchNorm, heads, LayerNorm)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spamkern.models import resnet, vit
from spamkern.pruning.groups import channel_families, unit_values


def _by_root(families):
    return {f.root: f for f in families}


def test_resnet_residual_stream_couples_every_block_of_a_stage():
    torch.manual_seed(0)
    model = resnet((3, 8, 8), 4, depth=10, widths=(4, 8))
    fams = _by_root(channel_families(model, torch.randn(2, 3, 8, 8)))
    stream = fams["stem.0"]
    assert stream.reason is None and stream.unit == 1 and not stream.is_output
    # the stem and every block's second conv + BN write the same 4 channels
    assert stream.producer_params() == {
        "stem.0.weight", "stem.1.weight", "stem.1.bias",
        "stages.0.0.conv2.weight", "stages.0.0.bn2.weight", "stages.0.0.bn2.bias",
        "stages.0.1.conv2.weight", "stages.0.1.bn2.weight", "stages.0.1.bn2.bias",
    }  # fmt: skip
    readers = {s.param for s in stream.consumers}
    assert readers == {
        "stages.0.0.conv1.weight", "stages.0.1.conv1.weight",
        "stages.1.0.conv1.weight", "stages.1.0.shortcut.0.weight",
    }  # fmt: skip
    inner = fams["stages.1.0.conv1"]
    assert inner.producer_params() == {
        "stages.1.0.conv1.weight",
        "stages.1.0.bn1.weight",
        "stages.1.0.bn1.bias",
    }
    assert {s.param for s in inner.consumers} == {"stages.1.0.conv2.weight"}
    assert fams["fc"].is_output


def test_unit_score_is_the_sum_over_the_coupled_producers():
    torch.manual_seed(1)
    model = resnet((3, 8, 8), 4, depth=6, widths=(4, 8))
    fam = _by_root(channel_families(model, torch.randn(2, 3, 8, 8)))["stages.1.0.conv1"]
    scores = {n: torch.rand_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    total, size = unit_values(fam, scores)
    want = (
        scores["stages.1.0.conv1.weight"].sum(dim=(1, 2, 3))
        + scores["stages.1.0.bn1.weight"]
        + scores["stages.1.0.bn1.bias"]
    )
    torch.testing.assert_close(total, want)
    assert size.tolist() == [4 * 9 + 2] * 8


def test_transformer_heads_mlp_and_layernorm_stream():
    torch.manual_seed(0)
    model = vit((3, 8, 8), 3, dim=8, depth=1, n_heads=2, patch=4)
    fams = _by_root(channel_families(model, torch.randn(2, 3, 8, 8)))
    attn = next(f for f in fams.values() if "blocks.0.attn.q.weight" in f.producer_params())
    assert attn.unit == 4 and attn.n_units == 2 and attn.reason is None
    assert {"blocks.0.attn.k.bias", "blocks.0.attn.v.weight"} <= attn.producer_params()
    assert {s.param for s in attn.consumers} == {"blocks.0.attn.proj.weight"}
    mlp = fams["blocks.0.mlp.0"]
    assert mlp.unit == 1 and mlp.reason is None and mlp.n_units == 16
    stream = next(f for f in fams.values() if "pos" in f.producer_params())
    assert "LayerNorm" in stream.reason


def test_untraceable_models_are_refused_naming_the_cause():
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)).detach()

    with pytest.raises(ValueError, match="no autograd graph"):
        channel_families(Detached(), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"forward on example_inputs raised RuntimeError"):
        channel_families(Detached(), torch.randn(2, 5))
    with pytest.raises(ValueError, match="example_inputs"):
        channel_families(Detached(), None)


@pytest.mark.parametrize("name", ["resnet", "vit", "lenet"])
def test_successors_name_the_reader_columns_of_each_unit(name):
    """Zeroing a unit's producers equals zeroing the reader's columns successors points at."""
    from spamkern.models import lenet
    from spamkern.pruning import apply_masks
    from spamkern.pruning.groups import successors

    torch.manual_seed(0)
    model = (
        {
            "resnet": lambda: resnet((3, 8, 8), 4, depth=6, widths=(4, 8)),
            "vit": lambda: vit((3, 8, 8), 3, dim=8, depth=1, n_heads=2, patch=4),
            "lenet": lambda: lenet((1, 8, 8)),
        }[name]()
        .double()
        .eval()
    )
    x = torch.randn(3, *model.input_shape if hasattr(model, "input_shape") else (1, 8, 8))
    x = x.double()
    fams = channel_families(model, x)
    succ = successors(model, x, fams)
    want = {"resnet": 2, "vit": 2, "lenet": 3}[name]  # residual streams are not listed
    assert len(succ) == want
    for source, (reader_name, _, cols) in succ.items():
        fam = next(f for f in fams if f"{source}.weight" in f.producer_params())
        removed = torch.zeros(fam.n_units, dtype=torch.bool)
        removed[0] = True
        chan = removed.repeat_interleave(fam.unit)
        params = dict(model.named_parameters())
        masks = {}
        for sl in fam.producers:
            m = masks.setdefault(sl.param, torch.ones_like(params[sl.param], dtype=torch.bool))
            m.index_fill_(sl.dim, sl.index[chan[sl.root]], False)
        with torch.no_grad():
            masked = apply_masks(copy.deepcopy(model), masks)(x)
            cut = copy.deepcopy(model)
            w = cut.get_submodule(reader_name).weight
            w.view(w.shape[0], -1)[:, chan.repeat_interleave(cols)] = 0
            torch.testing.assert_close(cut(x), masked)
