"""Masks survive optimiser steps; the online schedule fires at the right epochs."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import DiagPosterior, classification_data, make_mlp, n_params

import spamkern as sk
from spamkern.pruning import OnlinePruning, finetune, prune, random_scores


def _zero_where_masked(model, masks) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[n][~m] == 0).all()) for n, m in masks.items())


def test_finetune_keeps_masks_and_trains():
    model = make_mlp()
    x, y = classification_data(53, (7,), 3)
    masks = prune(model, random_scores(model), 0.7, prune_1d=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = finetune(model, (x, y), masks, epochs=4, lr=1e-2, batch_size=8, progress=False)
    assert _zero_where_masked(model, masks)
    for n, p in model.named_parameters():
        keep = masks.get(n, torch.ones_like(p, dtype=torch.bool))
        assert bool((p[keep] != before[n][keep]).any())  # kept weights are trained
    assert losses[-1] < losses[0]
    for opt in ("sgd",):
        finetune(model, (x, y), masks, epochs=1, lr=1e-2, optimizer=opt, progress=False)
        assert _zero_where_masked(model, masks)
    with pytest.raises(ValueError, match="optimizer"):
        finetune(model, (x, y), masks, epochs=1, optimizer="lion", progress=False)


def test_schedule_formula():
    op = OnlinePruning(final_sparsity=0.9, initial_sparsity=0.3, interval=3)
    e_total = 14  # ⌊14/3⌋ = 4 steps
    for e in range(0, 16):
        expected = 0.3 + 0.6 * min(e // 3, 4) / 4
        assert op.target(e, e_total) == pytest.approx(expected)


def test_online_fires_at_the_right_epochs_and_masks_persist():
    model = make_mlp()
    post = DiagPosterior(
        model, torch.rand(n_params(model), dtype=torch.float64), torch.ones(n_params(model)), 1.0
    )
    op = OnlinePruning(final_sparsity=0.8, initial_sparsity=0.0, interval=4)
    fired, previous = [], None
    for epoch in range(1, 18):  # a marglik step every epoch; E = 17, ⌊17/4⌋ = 4
        post.mean = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        masks = op.step(epoch, 17, model, post)
        if op.history and op.history[-1]["epoch"] == epoch:
            fired.append(epoch)
            assert masks.sparsity() == pytest.approx(op.target(epoch, 17), abs=1e-2)
            if previous is not None:  # a pruned weight never comes back
                assert all(bool((masks[n] <= previous[n]).all()) for n in masks)
            previous = {n: m.clone() for n, m in masks.items()}
            assert _zero_where_masked(model, masks)
    assert fired == [4, 8, 12, 16]
    assert [h["target"] for h in op.history] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_marglik_train_enforces_masks_and_runs_online_pruning():
    x, y = classification_data(64, (7,), 3)
    model = make_mlp()
    masks = prune(model, random_scores(model), 0.6)
    res = sk.marglik_train(
        model,
        (x, y),
        n_epochs=3,
        n_epochs_burnin=10,
        batch_size=16,
        masks=masks,
        n_hypersteps=2,
        progress=False,
    )
    assert _zero_where_masked(res.model, masks)
    params = dict(res.model.named_parameters())
    assert all(bool((params[n][m] != 0).all()) for n, m in masks.items())

    model = make_mlp(seed=1)
    op = OnlinePruning(final_sparsity=0.75, interval=2)
    res = sk.marglik_train(
        model,
        (x, y),
        n_epochs=6,
        n_epochs_burnin=0,
        marglik_frequency=1,
        batch_size=16,
        n_hypersteps=2,
        online_pruning=op,
        progress=False,
    )
    assert [h["epoch"] for h in op.history] == [2, 4, 6]
    assert [h["target"] for h in op.history] == pytest.approx([0.25, 0.5, 0.75])
    assert res.masks is not None and _zero_where_masked(res.model, res.masks)
