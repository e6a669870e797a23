"""Survivor reconstruction and unit compensation against dense float64 least squares."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pruning_helpers import classification_data, make_cnn
from torch import nn

import spamkern as sk
from spamkern.pruning import (
    compensate_units,
    input_statistics,
    masked_least_squares,
    reconstruct,
    reconstruct_layer,
)


def _samples(n, d, seed=0, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def _dense_rows(X, W, keep, bias=None):
    """Per row: least squares X_K w'_K (+ b') ≈ X w (+ b) with the pruned entries at zero."""
    new_w, new_b = torch.zeros_like(W), None if bias is None else torch.zeros_like(bias)
    for r in range(W.shape[0]):
        K = keep[r]
        target = X @ W[r] + (0.0 if bias is None else bias[r])
        cols = X[:, K] if bias is None else torch.cat([X[:, K], torch.ones_like(X[:, :1])], 1)
        sol = torch.linalg.lstsq(cols, target[:, None], driver="gelsd").solution[:, 0]
        new_w[r, K] = sol[: int(K.sum())]
        if bias is not None:
            new_b[r] = sol[-1]
    return new_w, new_b


@pytest.mark.parametrize("frac", (0.2, 0.5, 0.9))  # both solve sides (kept / pruned)
def test_masked_least_squares_matches_dense(frac):
    X = _samples(60, 11)
    W = _samples(7, 11, seed=1, shift=0.0)
    keep = torch.rand(7, 11, generator=torch.Generator().manual_seed(2)) > frac
    got = masked_least_squares(W, keep, X.T @ X / 60)
    expected, _ = _dense_rows(X, W, keep)
    torch.testing.assert_close(got, expected)


def test_masked_least_squares_per_row_diagonal():
    X = _samples(40, 8)
    W = _samples(5, 8, seed=1, shift=0.0)
    keep = torch.rand(5, 8, generator=torch.Generator().manual_seed(3)) > 0.6
    D = torch.rand(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    H = X.T @ X / 40
    got = masked_least_squares(W, keep, H, D)
    for r in range(5):
        K, P = keep[r], ~keep[r]
        Hr = H + torch.diag(D[r])
        ref = torch.zeros(8, dtype=torch.float64)
        ref[K] = W[r, K] + torch.linalg.solve(Hr[K][:, K], Hr[K][:, P] @ W[r, P])
        torch.testing.assert_close(got[r], ref)


def test_fully_kept_and_fully_pruned_rows():
    X = _samples(30, 6)
    W = _samples(3, 6, seed=1, shift=0.0)
    keep = torch.tensor([[True] * 6, [False] * 6, [True, False] * 3])
    got = masked_least_squares(W, keep, X.T @ X / 30)
    torch.testing.assert_close(got[0], W[0])
    assert bool((got[1] == 0).all())


@pytest.mark.parametrize("absorb", (False, True))
def test_reconstruct_layer_bias_absorbs_the_mean(absorb):
    X = _samples(80, 9, shift=2.0)
    W = _samples(4, 9, seed=1, shift=0.0)
    b = _samples(4, 1, seed=2, shift=0.0)[:, 0]
    keep = torch.rand(4, 9, generator=torch.Generator().manual_seed(5)) > 0.7
    A, mu = X.T @ X / 80, X.mean(0)
    w, new_b = reconstruct_layer(W, keep, A, b if absorb else None, mu if absorb else None, 0.0)
    exp_w, exp_b = _dense_rows(X, W, keep, b if absorb else None)
    torch.testing.assert_close(w, exp_w)
    if absorb:
        torch.testing.assert_close(new_b, exp_b)


def test_reconstruct_layer_conv_view():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = _samples(5 * 3 * 36, 1).reshape(5, 3, 6, 6)
    U = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    A, mu = input_statistics(conv, conv, x)
    torch.testing.assert_close(A, U.T @ U / U.shape[0])
    torch.testing.assert_close(mu, U.mean(0))
    keep = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.6
    w, b = reconstruct_layer(conv.weight.detach(), keep, A, conv.bias.detach(), mu, 0.0)
    exp_w, exp_b = _dense_rows(
        U, conv.weight.detach().reshape(4, -1), keep.reshape(4, -1), conv.bias.detach()
    )
    torch.testing.assert_close(w.reshape(4, -1), exp_w)
    torch.testing.assert_close(b, exp_b)


def _layer_inputs(model, layer, x):
    seen = []
    h = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = seen[0]
    if isinstance(layer, nn.Conv2d):
        return (
            F.unfold(a, layer.kernel_size, padding=layer.padding)
            .transpose(1, 2)
            .reshape(-1, layer.weight[0].numel())
        )
    return a


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.7), ("block", 0.5)])
def test_reconstruct_with_data_is_layer_by_layer_least_squares(pattern, sparsity):
    """Each layer re-solved on the inputs of the already pruned and reconstructed network."""
    model = make_cnn()
    x, _ = classification_data(40, (2, 6, 6), 4)
    masks = sk.prune(model, sk.magnitude_scores(model), sparsity, pattern=pattern, block=(1, 1))
    got = reconstruct(model, masks, data=x, damping=0.0)
    ref = sk.apply_masks(__import__("copy").deepcopy(model), masks)
    for name in ("0", "3", "6"):  # the prunable layers, in order
        layer, ref_layer = dict(model.named_modules())[name], dict(ref.named_modules())[name]
        X = _layer_inputs(ref, ref_layer, x)
        keep = masks[f"{name}.weight"].reshape(layer.weight.shape[0], -1)
        w, b = _dense_rows(X, layer.weight.detach().reshape(keep.shape), keep, layer.bias.detach())
        with torch.no_grad():
            ref_layer.weight.copy_(w.reshape(layer.weight.shape))
            ref_layer.bias.copy_(b)
        new = dict(got.named_modules())[name]
        torch.testing.assert_close(new.weight, ref_layer.weight)
        torch.testing.assert_close(new.bias, ref_layer.bias)


def test_reconstruct_two_four_on_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    x = _samples(50, 8)
    masks = sk.prune(model, sk.magnitude_scores(model), 0.5, pattern="2:4")
    got = reconstruct(model, masks, data=x, damping=0.0)
    w, b = _dense_rows(x, model[0].weight.detach(), masks["0.weight"], model[0].bias.detach())
    torch.testing.assert_close(got[0].weight, w)
    torch.testing.assert_close(got[0].bias, b)


def test_data_free_uses_the_posterior_factor_a():
    model = make_cnn()
    data = classification_data(30, (2, 6, 6), 4)
    post = sk.fit_laplace(model, data, prior="unitwise", progress=False)
    masks = sk.prune(model, sk.opd_scores(post), 0.6)
    lam = 0.05
    got = reconstruct(model, masks, posterior=post, damping=lam, absorb_bias=False)
    for index, (name, _) in enumerate(post.named_params):
        if name not in masks or not name.endswith("weight"):
            continue
        A = post.kron_factors[index][1]
        H = A + lam * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
        W = dict(model.named_parameters())[name].detach()
        keep = masks[name].reshape(W.shape[0], -1)
        W2 = W.reshape(keep.shape)
        ref = torch.zeros_like(W2)
        for r in range(W2.shape[0]):
            K, P = keep[r], ~keep[r]
            ref[r, K] = W2[r, K] + torch.linalg.solve(H[K][:, K], H[K][:, P] @ W2[r, P])
        torch.testing.assert_close(dict(got.named_parameters())[name].reshape(keep.shape), ref)


def test_data_free_prior_damping_is_the_posterior_row_block():
    model = make_cnn()
    data = classification_data(30, (2, 6, 6), 4)
    post = sk.fit_laplace(model, data, prior="unitwise", progress=False)
    masks = sk.prune(model, sk.opd_scores(post), 0.6)
    got = reconstruct(model, masks, posterior=post, damping="prior", absorb_bias=False)
    names = [n for n, _ in post.named_params]
    i = names.index("6.weight")
    G, A = post.kron_factors[i]
    W = model[6].weight.detach()
    delta = dict(
        zip(
            names,
            sk.pruning.scores._to_output(
                post.named_params, post.prior.precision_diag().detach(), True
            ).values(),
        )
    )["6.weight"]
    keep, s = masks["6.weight"], post.curvature_scale
    for r in range(W.shape[0]):
        Hr = s * G[r, r] * A + torch.diag(delta[r])  # the posterior's own row block
        K, P = keep[r], ~keep[r]
        ref = torch.zeros_like(W[r])
        ref[K] = W[r, K] + torch.linalg.solve(Hr[K][:, K], Hr[K][:, P] @ W[r, P])
        torch.testing.assert_close(got[6].weight[r], ref)


def test_data_free_needs_kronecker_factors():
    model = make_cnn()
    post = sk.fit_laplace(
        model, classification_data(20, (2, 6, 6), 4), structure="diag", progress=False
    )
    masks = sk.prune(model, sk.opd_scores(post), 0.5)
    with pytest.raises(ValueError, match="Kronecker"):
        reconstruct(model, masks, posterior=post)
    with pytest.raises(ValueError, match="damping"):
        reconstruct(model, masks, posterior=post, damping=-1.0)


# ---------------------------------------------------------------------------- units
@pytest.mark.parametrize("layer", ("0", "3", "6"))  # conv→conv, conv→flatten→linear, linear
def test_unit_compensation_is_least_squares_on_the_next_inputs(layer):
    model = make_cnn()
    x, _ = classification_data(60, (2, 6, 6), 4)
    weight = dict(model.named_parameters())[f"{layer}.weight"]
    keep_units = torch.ones(weight.shape[0], dtype=torch.bool)
    keep_units[[1, 3]] = False
    wm = keep_units.view(-1, *([1] * (weight.ndim - 1))).expand_as(weight).clone()
    masks = sk.pruning.PruningMasks(
        {f"{layer}.weight": wm, f"{layer}.bias": keep_units.clone()}, pattern="unit"
    )
    got = reconstruct(model, masks, data=x, damping=0.0)
    alt = compensate_units(model, masks, data=x, damping=0.0)
    for p, q in zip(got.parameters(), alt.parameters()):
        assert torch.equal(p, q)
    nxt = {"0": "3", "3": "6", "6": "8"}[layer]
    nlayer = dict(model.named_modules())[nxt]
    X = _layer_inputs(model, nlayer, x)
    cols = X.shape[1] // weight.shape[0] if nxt != "3" else 9
    removed = (~keep_units).repeat_interleave(cols)
    Z = torch.cat([X[:, ~removed], torch.ones_like(X[:, :1])], 1)
    Bc = torch.linalg.lstsq(Z, X[:, removed], driver="gelsd").solution  # a_S ≈ [a_K 1] [B c]ᵀ
    W = nlayer.weight.detach().reshape(nlayer.weight.shape[0], -1)
    exp_w = W[:, ~removed] + W[:, removed] @ Bc[:-1].T
    exp_b = nlayer.bias.detach() + W[:, removed] @ Bc[-1]
    new = dict(got.named_modules())[nxt]
    new_w = new.weight.reshape(W.shape[0], -1)
    # compared as predictions on the data: dead inputs leave the weights non-unique
    torch.testing.assert_close(
        X[:, ~removed] @ new_w[:, ~removed].T + new.bias, X[:, ~removed] @ exp_w.T + exp_b
    )
    assert bool((new_w[:, removed] == 0).all())
    pruned = dict(got.named_modules())[layer]
    assert bool((pruned.weight[~keep_units] == 0).all())
    assert bool((pruned.bias[~keep_units] == 0).all())


class _Wrapped(nn.Module):
    """make_cnn behind a custom forward: not a plain chain, so it is traced."""

    def __init__(self):
        super().__init__()
        self.body = make_cnn()

    def forward(self, x):
        return self.body(x)


def test_traced_compensation_of_a_wrapped_chain_is_the_chain_s():
    model = _Wrapped()
    x, _ = classification_data(40, (2, 6, 6), 4)
    masks = sk.prune(model.body, sk.magnitude_scores(model.body), 0.4, pattern="unit")
    plain = compensate_units(model.body, masks, data=x)
    wrapped_masks = sk.pruning.PruningMasks(
        {f"body.{k}": v for k, v in masks.items()}, pattern="unit"
    )
    skipped = []
    traced = compensate_units(model, wrapped_masks, data=x, example_inputs=x[:4], skipped=skipped)
    assert skipped == []
    for (n, p), (_, q) in zip(plain.named_parameters(), traced.body.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=n)
    with pytest.raises(ValueError, match="example_inputs"):  # conv input: no batch to trace
        reconstruct(model, wrapped_masks, data=x)


# ---------------------------------------------------------------------------- traced units
def _traced_case(name: str):
    from spamkern.models import resnet, vit

    torch.manual_seed(0)
    if name == "resnet":
        model = resnet((3, 8, 8), 5, depth=6, widths=(4, 8)).double()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        source, reader = "stages.0.0.conv1", "stages.0.0.conv2"  # conv–BN–ReLU → conv
    else:
        model = vit((3, 8, 8), 5, dim=16, depth=2, n_heads=4, patch=4).double()
        source, reader = "blocks.0.mlp.0", "blocks.0.mlp.2"  # Linear–GELU → Linear (bias)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(48, 3, 8, 8, generator=g, dtype=torch.float64) + 0.5
    return model.eval(), data, source, reader


def _reader_inputs(model, layer, x):
    """Rows of ``layer``'s input on x (Conv2d: unfolded patches), in eval mode."""
    seen = []
    h = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    a = seen[0]
    if isinstance(layer, nn.Conv2d):
        u = F.unfold(a, layer.kernel_size, padding=layer.padding, stride=layer.stride)
        return u.transpose(1, 2).reshape(-1, layer.weight[0].numel())
    return a.reshape(-1, a.shape[-1])


@pytest.mark.parametrize("name", ("resnet", "vit"))
def test_traced_unit_compensation_is_dense_least_squares_for_one_layer(name):
    """One family's units removed: its reader's new weights are the dense least-squares
    fit of the reader's original output from the kept inputs (and a constant, for a
    reader with a bias), and they lower the reader's output error on the data."""
    model, data, source, reader = _traced_case(name)
    full = sk.prune(model, sk.magnitude_scores(model), 0.5, pattern="unit", example_inputs=data)
    owners = (source, source.replace("conv1", "bn1"))  # the ResNet's conv1 feeds bn1
    family = {k: v for k, v in full.items() if k.rpartition(".")[0] in owners}
    masks = sk.pruning.PruningMasks(family, pattern="unit")
    removed_units = ~masks[f"{source}.weight"].reshape(masks[f"{source}.weight"].shape[0], -1).any(
        1
    )
    assert 0 < int(removed_units.sum()) < removed_units.numel()
    comp = compensate_units(model, masks, data=data, damping=0.0, example_inputs=data[:4])
    old = dict(model.named_modules())[reader]
    new = dict(comp.named_modules())[reader]
    X = _reader_inputs(model, old, data)
    cols = X.shape[1] // removed_units.numel()
    removed = removed_units.repeat_interleave(cols)
    W = old.weight.detach().reshape(old.weight.shape[0], -1)
    bias = old.bias.detach() if old.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
    target = X @ W.T + bias
    Z = X[:, ~removed]
    if old.bias is not None:
        Z = torch.cat([Z, torch.ones_like(Z[:, :1])], 1)
    sol = torch.linalg.lstsq(Z, target, driver="gelsd").solution
    new_w = new.weight.detach().reshape(W.shape[0], -1)
    new_b = new.bias.detach() if new.bias is not None else torch.zeros_like(bias)
    torch.testing.assert_close(
        new_w[:, ~removed], sol[: int((~removed).sum())].T, rtol=1e-8, atol=1e-8
    )
    if old.bias is not None:
        torch.testing.assert_close(new_b, sol[-1], rtol=1e-8, atol=1e-8)
    assert bool((new_w[:, removed] == 0).all())
    err_comp = (X[:, ~removed] @ new_w[:, ~removed].T + new_b - target).norm()
    err_none = (X[:, ~removed] @ W[:, ~removed].T + bias - target).norm()
    assert float(err_comp) < 0.9 * float(err_none)


@pytest.mark.parametrize("name", ("resnet", "vit"))
def test_traced_sparsify_is_the_compressed_compensated_model(name):
    model, data, _, _ = _traced_case(name)
    x = data[:4]
    result = sk.sparsify(
        model, None, 0.5, pattern="unit", method="magnitude", data=data, example_inputs=x
    )
    assert result.reconstruct == "data"
    skipped = []
    ref = compensate_units(model, result.masks, data=data, example_inputs=x, skipped=skipped)
    assert tuple(skipped) == result.uncompensated
    # residual streams have no single reader; the ViT's go through LayerNorm (never pruned)
    assert bool(result.uncompensated) == (name == "resnet")
    probe = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        got, want = result.model.eval()(probe), ref.eval()(probe)
    assert float((got - want).norm() / want.norm()) <= 1e-8
    assert sk.pruning.count_params(result.model) < sk.pruning.count_params(model)
    masked = sk.apply_masks(copy.deepcopy(model), result.masks).eval()
    with torch.no_grad():
        assert float((masked(probe) - want).norm()) > 1e-6  # compensation changed the model


def test_curvature_pass_records_the_input_means_for_bias_absorption():
    model = make_cnn()
    x, y = classification_data(30, (2, 6, 6), 4)
    post = sk.fit_laplace(model, (x, y), batch_size=7, progress=False)
    names = [n for n, _ in post.named_params]
    for name in ("0.weight", "3.weight", "6.weight", "8.weight"):
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        A, mu = input_statistics(model, layer, x)
        i = names.index(name)
        torch.testing.assert_close(post.curvature.input_means[i], mu)
        torch.testing.assert_close(post.curvature.factors[i][1], A)
    masks = sk.prune(model, sk.opd_scores(post), 0.6)
    got = reconstruct(model, masks, posterior=post, damping=0.0)
    A, mu = input_statistics(model, model[6], x)
    w, b = reconstruct_layer(
        model[6].weight.detach(), masks["6.weight"], A, model[6].bias.detach(), mu, 0.0
    )
    torch.testing.assert_close(got[6].weight, w)
    torch.testing.assert_close(got[6].bias, b)
    assert not torch.allclose(got[6].bias, model[6].bias)


def test_singular_h_without_damping_is_a_clear_error():
    X = _samples(30, 6)
    X[:, 2] = 0.0  # a dead input makes A singular
    W = _samples(3, 6, seed=1, shift=0.0)
    H = X.T @ X / 30
    few = torch.tensor([[False, False, True, False, False, True]] * 3)
    with pytest.raises(ValueError, match="damping"):
        masked_least_squares(W, few, H)  # kept side: H_KK is singular
    with pytest.raises(ValueError, match="damping"):
        masked_least_squares(W, ~few, H)  # pruned side: H itself is factorised
