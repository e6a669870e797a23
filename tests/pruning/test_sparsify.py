"""sk.sparsify: invariants of the one-call pruning for every method and pattern."""

from __future__ import annotations

import copy

import pytest
import torch
from pruning_helpers import classification_data, make_cnn
from torch import nn

import spamkern as sk
from spamkern.pruning import reconstruct


@pytest.fixture(scope="module")
def setting():
    model = make_cnn()
    data = classification_data(40, (2, 6, 6), 4)
    post = sk.fit_laplace(model, data, prior="unitwise", progress=False)
    return model, data, post


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "method,reconstruct_mode",
    [
        ("opd", "none"),
        ("obs", "posterior"),
        ("prior", "data"),
        ("kron", "posterior"),
        ("kron", "data"),
        ("magnitude", "none"),
        ("magnitude", "data"),
    ],
)
def test_unstructured_invariants(setting, method, reconstruct_mode):
    model, data, post = setting
    before = _state(model)
    result = sk.sparsify(
        model,
        post,
        0.7,
        method=method,
        reconstruct=reconstruct_mode,
        data=data if reconstruct_mode == "data" else None,
    )
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    assert result.model is not model
    assert result.method == method and result.reconstruct == reconstruct_mode
    n_total = sum(m.numel() for m in result.masks.values())
    n_kept = sum(int(m.sum()) for m in result.masks.values())
    assert n_total - n_kept == round(0.7 * n_total)  # exact sparsity
    params = dict(result.model.named_parameters())
    for name, m in result.masks.items():
        assert bool((params[name][~m] == 0).all())
    changed = any(
        not torch.equal(params[n][m], dict(model.named_parameters())[n].detach()[m])
        for n, m in result.masks.items()
    )
    assert changed == (reconstruct_mode != "none")


@pytest.mark.parametrize("pattern,sparsity", [("unit", 0.4), ("block", 0.5)])
def test_structured_patterns(setting, pattern, sparsity):
    model, data, post = setting
    result = sk.sparsify(model, post, sparsity, pattern=pattern, block=(1, 1), data=data)
    assert result.masks.pattern == pattern
    assert result.masks.sparsity() == pytest.approx(sparsity, abs=0.05)


def test_unit_model_is_the_compressed_compensated_model(setting):
    model, data, post = setting
    result = sk.sparsify(model, post, 0.4, pattern="unit", method="obs", data=data)
    masked = reconstruct(model, result.masks, data=data)
    assert sk.pruning.count_params(result.model) < sk.pruning.count_params(model)
    probe = classification_data(7, (2, 6, 6), 4, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(result.model(probe), masked(probe))


def test_reconstruction_keeps_the_function_on_relu_inputs():
    """The fix for OPD's failure mode: survivors re-solved on ReLU/pooling inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3)
    ).double()
    x, y = classification_data(200, (6,), 3)
    post = sk.fit_laplace(model, (x, y), progress=False)
    with torch.no_grad():
        dense = model(x)

    def error(m):
        with torch.no_grad():
            return float((m(x) - dense).square().mean())

    plain = sk.sparsify(model, post, 0.8, method="opd", reconstruct="none").model
    free = sk.sparsify(model, post, 0.8, method="opd").model
    rebuilt = sk.sparsify(model, post, 0.8, method="opd", data=x).model
    assert error(rebuilt) < error(free) < error(plain)


def test_magnitude_needs_no_posterior(setting):
    model, data, _ = setting
    result = sk.sparsify(model, None, 0.5, method="magnitude", data=data)
    assert result.reconstruct == "data"
    assert sk.sparsify(model, None, 0.5, method="magnitude").reconstruct == "none"


def test_default_method_and_auto_reconstruction(setting):
    model, _, post = setting
    result = sk.sparsify(model, post, 0.5)
    assert result.method == sk.pruning.DEFAULT_METHOD
    assert result.reconstruct == "posterior"
    diag = sk.fit_laplace(
        model, classification_data(20, (2, 6, 6), 4), structure="diag", progress=False
    )
    assert sk.sparsify(model, diag, 0.5).reconstruct == "none"


def test_bad_arguments(setting):
    model, data, post = setting
    with pytest.raises(ValueError, match="method"):
        sk.sparsify(model, post, 0.5, method="nope")
    with pytest.raises(ValueError, match="reconstruct"):
        sk.sparsify(model, post, 0.5, reconstruct="nope")
    with pytest.raises(ValueError, match="needs data"):
        sk.sparsify(model, post, 0.5, reconstruct="data")
    with pytest.raises(ValueError, match="posterior"):
        sk.sparsify(model, None, 0.5, method="obs")
    with pytest.raises(ValueError, match="sparsity"):
        sk.sparsify(model, post, 1.5)
    with pytest.raises(TypeError, match="nn.Module"):
        sk.sparsify("model", post, 0.5)


@pytest.mark.parametrize("method", ("opd", "obs", "prior", "kron"))
def test_laplace_torch_posterior(method):
    from laplace import KronLaplace

    from spamkern.integrations.laplace import SpamkernGGN

    model = copy.deepcopy(make_cnn())
    x, y = classification_data(30, (2, 6, 6), 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=15)
    la = KronLaplace(model, "classification", prior_precision=0.5, backend=SpamkernGGN)
    la.fit(loader, progress_bar=False)
    ours = sk.fit_laplace(model, (x, y), prior="scalar", prior_precision=0.5, progress=False)
    ours.curvature.input_means = {}  # laplace-torch records no input means: no bias absorption
    a = sk.sparsify(model, la, 0.6, method=method)
    b = sk.sparsify(model, ours, 0.6, method=method)
    assert a.reconstruct == "posterior"
    for name in b.masks:
        assert torch.equal(a.masks[name], b.masks[name])
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_online_pruning_uses_the_same_machinery(setting):
    model, data, post = setting
    work = copy.deepcopy(model)
    post_w = sk.fit_laplace(work, data, prior="unitwise", progress=False)
    op = sk.OnlinePruning(final_sparsity=0.6, interval=1, method="obs", reconstruct="posterior")
    masks = op.step(1, 1, work, post_w)
    expected = sk.sparsify(model, post, 0.6, method="obs", reconstruct="posterior")
    for name in masks:
        assert torch.equal(masks[name], expected.masks[name])
    for (n, p), (_, q) in zip(work.named_parameters(), expected.model.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)
    with pytest.raises(ValueError, match="either"):
        sk.OnlinePruning(0.5, score_fn=sk.opd_scores, method="obs")


def test_units_of_a_non_sequential_model_are_compensated_through_the_trace(setting):
    _, data, _ = setting

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_cnn()

        def forward(self, x):
            return self.body(x)

    model = Wrapped()
    post = sk.fit_laplace(model, data, progress=False)
    x = data[0][:3]
    result = sk.sparsify(model, post, 0.3, pattern="unit", example_inputs=x)
    assert result.reconstruct == "posterior" and result.uncompensated == ()
    want = sk.pruning.compensate_units(model, result.masks, post, example_inputs=x)
    masked = sk.apply_masks(copy.deepcopy(model), result.masks)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), want(x), rtol=1e-10, atol=1e-12)
        assert float((result.model(x) - masked(x)).abs().max()) > 1e-6
    with pytest.raises(ValueError, match="example_inputs"):  # nothing to trace it on
        sk.sparsify(model, post, 0.3, pattern="unit", reconstruct="data", data=data)


def test_default_for_a_dense_laplace_torch_posterior_is_obs():
    from laplace import FullLaplace

    from spamkern.integrations.laplace import SpamkernGGN

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = classification_data(20, (5,), 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    la = FullLaplace(model, "classification", prior_precision=0.7, backend=SpamkernGGN)
    la.fit(loader, progress_bar=False)
    result = sk.sparsify(model, la, 0.5, data=x)
    assert result.method == "obs" and result.reconstruct == "data"
    expected = sk.prune(model, sk.obs_scores(la), 0.5)
    for name in expected:
        assert torch.equal(result.masks[name], expected[name])


def test_kron_unit_selection_of_a_traced_chain_is_the_chain_s(setting):
    """Traced next layers give the plain chain's greedy group-OBS selection."""
    body, data, post = setting

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = copy.deepcopy(body)

        def forward(self, x):
            return self.body(x)

    model = Wrapped()
    post_w = sk.fit_laplace(model, data, prior="unitwise", progress=False)
    x = data[0][:3]
    want = sk.sparsify(body, post, 0.4, pattern="unit", method="kron", reconstruct="none")
    got = sk.sparsify(
        model, post_w, 0.4, pattern="unit", method="kron", reconstruct="none", example_inputs=x
    )
    assert sorted(got.masks) == sorted(f"body.{k}" for k in want.masks)
    for k, m in want.masks.items():
        assert torch.equal(got.masks[f"body.{k}"], m), k
    assert got.masks.sparsity() == pytest.approx(want.masks.sparsity())


def test_kron_unit_selection_follows_heads_and_mlp_readers_of_a_vit():
    from spamkern.models import resnet, vit
    from spamkern.pruning.saliency import _unit_layers
    from spamkern.pruning.scores import posterior_terms

    torch.manual_seed(0)
    model = vit((3, 8, 8), 5, dim=16, depth=1, n_heads=4, patch=4).double()
    X = torch.randn(24, 3, 8, 8, dtype=torch.float64)
    data = (X, torch.randint(0, 5, (24,)))
    post = sk.fit_laplace(model, data, prior="unitwise", progress=False)
    opd = sk.prune(model, sk.opd_scores(post), 0.5, pattern="unit", example_inputs=X[:4])
    layers = _unit_layers(posterior_terms(post), model, opd, False, X[:4])
    got = {name: (W.shape, cols) for name, _, _, W, cols, _ in layers}
    assert got == {
        "blocks.0.attn.v": (torch.Size([16, 16]), 4),  # heads of width 4 → proj columns
        "blocks.0.mlp.0": (torch.Size([16, 32]), 1),
    }
    result = sk.sparsify(
        model, post, 0.5, pattern="unit", method="kron", example_inputs=X[:4], data=X
    )
    assert result.method == "kron" and result.uncompensated == ()
    heads = result.masks["blocks.0.attn.q.weight"].all(dim=1).reshape(4, 4)
    assert bool((heads.all(dim=1) | ~heads.any(dim=1)).all())  # whole heads only
    for p in ("k", "v"):
        assert torch.equal(
            result.masks[f"blocks.0.attn.{p}.weight"], result.masks["blocks.0.attn.q.weight"]
        )
    # a ResNet's residual channel groups have no single reader: the generic rounds run
    net = resnet((3, 8, 8), 5, depth=6, widths=(4, 8)).double()
    post_r = sk.fit_laplace(net, data, prior="unitwise", progress=False)
    opd_r = sk.prune(net, sk.opd_scores(post_r), 0.5, pattern="unit", example_inputs=X[:4])
    assert _unit_layers(posterior_terms(post_r), net, opd_r, False, X[:4]) is None
