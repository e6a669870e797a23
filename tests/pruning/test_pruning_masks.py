"""Masks: exact sparsity, the shape rules of every pattern, scopes, errors, enforcement."""

from __future__ import annotations

import copy

import pytest
import torch
from pruning_helpers import make_cnn, make_mlp, n_params
from torch import nn

from spamkern.pruning import apply_masks, prune, random_scores
from spamkern.pruning.scores import scores_to_dict

LEVELS = (0.0, 0.2, 0.37, 0.75, 0.9, 0.99)


def _rand_scores(model: nn.Module, seed: int = 0) -> torch.Tensor:
    return random_scores(model, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("s", LEVELS)
def test_unstructured_global_exact_and_threshold(s):
    model = make_cnn()
    scores = _rand_scores(model)
    masks = prune(model, scores, s)
    sd = scores_to_dict(model, scores)
    # default: weights of every layer but the output layer; no biases
    assert set(masks) == {"0.weight", "3.weight", "6.weight"}
    total = sum(m.numel() for m in masks.values())
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == round(s * total)
    kept = torch.cat([sd[n][m] for n, m in masks.items()])
    gone = torch.cat([sd[n][~m] for n, m in masks.items()])
    if gone.numel() and kept.numel():
        assert float(gone.max()) <= float(kept.min())


def test_unstructured_ties_still_exact():
    model = make_mlp()
    scores = torch.randint(0, 3, (n_params(model),)).double()  # massive ties
    masks = prune(model, scores, 0.6)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)


def test_unstructured_layerwise_and_options():
    model = make_mlp()
    scores = _rand_scores(model, 1)
    masks = prune(model, scores, 0.45, scope="layerwise")
    for m in masks.values():
        assert int((~m).sum()) == round(0.45 * m.numel())
    with_all = prune(model, scores, 0.45, prune_output_layer=True, prune_1d=True)
    assert set(with_all) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("s", [0.3, 0.8, 0.99])
def test_unit_masks_remove_whole_units(scope, s):
    model = make_cnn()
    scores = _rand_scores(model, 2)
    masks = prune(model, scores, s, pattern="unit", scope=scope)
    sd = scores_to_dict(model, scores)
    layers = ["0", "3", "6"]  # output layer "8" is excluded
    assert set(masks) == {f"{n}.{a}" for n in layers for a in ("weight", "bias")}
    removed_total = units_total = 0
    means_gone, means_kept = [], []
    for n in layers:
        w, b = masks[f"{n}.weight"], masks[f"{n}.bias"]
        rows = w.reshape(w.shape[0], -1)
        assert torch.equal(rows.all(1), rows.any(1))  # whole rows only
        assert torch.equal(rows.any(1), b)  # bias entry goes with its row
        assert bool(b.any())  # at least one unit per layer stays
        unit = (sd[f"{n}.weight"].reshape(w.shape[0], -1).sum(1) + sd[f"{n}.bias"]) / (
            rows.shape[1] + 1
        )
        if scope == "layerwise":
            assert int((~b).sum()) == min(round(s * b.numel()), b.numel() - 1)
            if (~b).any():
                assert float(unit[~b].max()) <= float(unit[b].min())
        means_gone.append(unit[~b])
        means_kept.append(unit[b])
        removed_total += int((~b).sum())
        units_total += b.numel()
    if scope == "global":
        assert removed_total == min(round(s * units_total), units_total - len(layers))
        gone, kept = torch.cat(means_gone), torch.cat(means_kept)
        # every removed unit ranks below every kept one, except the protected best per layer
        assert int((kept < gone.max()).sum()) <= len(layers)
    assert masks.sparsity() == pytest.approx(removed_total / units_total)


def test_block_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    scores = _rand_scores(model, 3)
    sd = scores_to_dict(model, scores)
    masks = prune(model, scores, 0.5, pattern="block", block=(2, 4))
    assert set(masks) == {"0.weight", "2.weight"} and masks.block == (2, 4)
    n_blocks = removed = 0
    sums_gone, sums_kept = [], []
    for n, m in masks.items():
        o, i = m.shape
        blocks = m.reshape(o // 2, 2, i // 4, 4)
        flat = blocks.permute(0, 2, 1, 3).reshape(o // 2, i // 4, 8)
        assert torch.equal(flat.all(-1), flat.any(-1))  # each block all-or-nothing
        bsum = sd[n].reshape(o // 2, 2, i // 4, 4).sum((1, 3))
        keep = flat.any(-1)
        sums_gone.append(bsum[~keep])
        sums_kept.append(bsum[keep])
        n_blocks += keep.numel()
        removed += int((~keep).sum())
    assert removed == round(0.5 * n_blocks)
    assert float(torch.cat(sums_gone).max()) <= float(torch.cat(sums_kept).min())
    with pytest.raises(ValueError, match="does not divide"):
        prune(model, scores, 0.5, pattern="block", block=(3, 4))
    with pytest.raises(ValueError, match="block must be a pair"):
        prune(model, scores, 0.5, pattern="block", block=(0, 4))


def test_two_four_groups_within_rows():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 2), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 8), nn.Linear(8, 3)
    ).double()
    scores = _rand_scores(model, 4)
    sd = scores_to_dict(model, scores)
    masks = prune(model, scores, 0.5, pattern="2:4")
    for n in ("0.weight", "3.weight"):
        m = masks[n].reshape(masks[n].shape[0], -1)
        g = m.reshape(m.shape[0], -1, 4)
        assert bool((g.sum(-1) == 2).all())
        s = sd[n].reshape(m.shape[0], -1, 4)
        kept_min = s.masked_fill(~g, float("inf")).min(-1).values
        gone_max = s.masked_fill(g, float("-inf")).max(-1).values
        assert bool((gone_max <= kept_min).all())
    bad = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        prune(bad, _rand_scores(bad), 0.5, pattern="2:4")
    with pytest.raises(ValueError, match="sparsity=0.5"):
        prune(model, scores, 0.7, pattern="2:4")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad):
    model = make_mlp()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune(model, _rand_scores(model), bad)


def test_bad_arguments():
    model = make_mlp()
    scores = _rand_scores(model)
    with pytest.raises(ValueError, match="pattern"):
        prune(model, scores, 0.5, pattern="rows")
    with pytest.raises(ValueError, match="scope"):
        prune(model, scores, 0.5, scope="local")
    with pytest.raises(ValueError, match="P = "):
        prune(model, scores[:-1], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        prune(model, torch.full_like(scores, float("nan")), 0.5)
    with pytest.raises(TypeError):
        prune(model, scores, "0.5")


def test_apply_masks_zeroes_exactly_and_checks_names():
    model = make_mlp()
    masks = prune(model, _rand_scores(model), 0.6, prune_1d=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_masks(model, masks)
    for n, p in model.named_parameters():
        m = masks.get(n, torch.ones_like(p, dtype=torch.bool))
        assert bool((p[~m] == 0).all())
        assert torch.equal(p[m], before[n][m])
    with pytest.raises(ValueError, match="not a parameter"):
        apply_masks(model, {"9.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        apply_masks(model, {"0.weight": torch.ones(3, 3, dtype=torch.bool)})


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["unstructured", "unit", "2:4"])
def test_prune_on_the_gpu_matches_the_cpu(pattern):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5)
    ).float()
    scores = _rand_scores(model, 7).float()
    s = 0.5 if pattern == "2:4" else 0.83
    on_cpu = prune(model, scores, s, pattern=pattern)
    gpu_model = copy.deepcopy(model).cuda()
    on_gpu = prune(gpu_model, scores.cuda(), s, pattern=pattern)
    assert set(on_cpu) == set(on_gpu)
    for name, m in on_gpu.items():
        assert m.is_cuda and torch.equal(m.cpu(), on_cpu[name])
    apply_masks(gpu_model, on_gpu)
    assert all(
        bool((p[~on_gpu[n]] == 0).all()) for n, p in gpu_model.named_parameters() if n in on_gpu
    )


def test_prune_accepts_a_fitted_posterior_and_scores_it_with_opd():
    import spamkern as sk

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    )
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    post = sk.fit_laplace(model, (X, y), progress=False)
    from_posterior = sk.prune(model, post, sparsity=0.5)
    from_scores = sk.prune(model, sk.opd_scores(post), sparsity=0.5)
    assert from_posterior.keys() == from_scores.keys()
    for name in from_scores:
        assert torch.equal(from_posterior[name], from_scores[name])
