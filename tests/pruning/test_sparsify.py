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


def test_units_of_a_non_sequential_model_skip_compensation(setting):
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
    assert result.reconstruct == "none"
    masked = sk.apply_masks(copy.deepcopy(model), result.masks)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), masked(x))
    with pytest.raises(ValueError, match="Sequential"):
        sk.sparsify(
            model, post, 0.3, pattern="unit", reconstruct="data", data=data, example_inputs=x
        )
