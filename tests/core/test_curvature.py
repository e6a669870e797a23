"""Curvature pass against dense float64 references built per sample.

* structure="diag" equals the diagonal of the dense GGN / EF (every tensor, any module);
* Kronecker factors equal the KFAC formula computed by per-sample, per-position loops, and
  for one sample at one position G ⊗ A is the exact GGN block;
* under structure="kron", tensors outside Linear/Conv2d get their exact diagonal;
* every batch counts: the result does not depend on how the data is split, whether it comes
  as a DataLoader, a list, dict batches or in-memory tensors;
* the MC-GGN is an unbiased estimate of the GGN.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spamkern as sk
from spamkern.data.batches import as_batches

from . import models as M
from .dense import dense_curvature, flat_theta, jacobians, naive_kfac, rel_err

TOL = 1e-10

CASES = {
    "mlp": (M.mlp, "classification"),
    "mlp-no-last-bias": (partial(M.mlp, widths=(6,), bias_last=False), "classification"),
    "cnn": (M.cnn, "classification"),
    "mixed": (M.mixed, "classification"),
    "cnn-norm": (M.cnn_norm, "classification"),
    "reg-mlp": (M.regression_mlp, "regression"),
    "reg-cnn": (M.regression_cnn, "regression"),
}


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("case", list(CASES))
def test_diag_structure_is_the_dense_diagonal(case, curvature):
    factory, likelihood = CASES[case]
    model, X, y = factory(seed=5)
    H, loss = dense_curvature(model, X, y, likelihood, curvature)
    post = sk.fit_laplace(
        model, M.loader(X, y, 4), likelihood=likelihood, structure="diag", curvature=curvature
    )
    assert rel_err(post.curvature_diag(), H.diagonal()) < TOL
    assert float(post.curvature.loss) == pytest.approx(float(loss), rel=TOL)
    assert post.n_data == len(y) and post.curvature.n_outputs == (y.shape[1] if y.ndim > 1 else 3)
    assert torch.equal(post.mean, flat_theta(model))


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("case", ["mlp", "mlp-no-last-bias", "cnn", "reg-cnn", "mixed", "cnn-norm"])
def test_kron_factors_equal_naive_kfac(case, curvature):
    factory, likelihood = CASES[case]
    model, X, y = factory(seed=6)
    ref = naive_kfac(model, X, y, likelihood, curvature)
    H, _ = dense_curvature(model, X, y, likelihood, curvature)
    post = sk.fit_laplace(
        model, M.loader(X, y, 3), likelihood=likelihood, structure="kron", curvature=curvature
    )
    names = [name for name, _ in model.named_parameters()]
    assert [b.name for b in post.blocks] == names
    checked = 0
    for block, factors in zip(post.blocks, post.kron_factors, strict=True):
        if block.name in ref:
            assert isinstance(factors, tuple) and len(factors) == len(ref[block.name])
            for ours, theirs in zip(factors, ref[block.name]):
                assert rel_err(ours, theirs) < TOL
            checked += 1
        else:  # LayerNorm, BatchNorm, bare Parameter: the exact diagonal of H
            sl = slice(block.offset, block.offset + block.numel)
            assert isinstance(factors, torch.Tensor) and factors.shape == block.shape
            assert rel_err(factors.reshape(-1), H.diagonal()[sl]) < TOL
    assert checked == len(ref)


def _single_position_models():
    """Models whose Linear/Conv2d layers see one sample at one position each."""
    torch.manual_seed(8)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    conv = nn.Sequential(  # a (3, 2) kernel over a (3, 2) input: one output position
        nn.Conv2d(2, 4, kernel_size=(3, 2)), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)
    ).double()
    return [
        (mlp, torch.randn(1, 4, dtype=torch.float64)),
        (conv, torch.randn(1, 2, 3, 2, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_kron_is_exact_ggn_block_for_one_sample(index):
    model, X = _single_position_models()[index]
    y = torch.tensor([1])
    H, _ = dense_curvature(model, X, y)
    post = sk.fit_laplace(model, (X, y), structure="kron")
    for block, factors in zip(post.blocks, post.kron_factors):
        sl = slice(block.offset, block.offset + block.numel)
        exact = H[sl, sl]
        ours = torch.kron(*factors) if len(factors) == 2 else factors[0]
        assert rel_err(ours, exact) < TOL


def test_other_modules_under_kron_and_dict_batches():
    """Embedding + Linear head with dict batches: exact diagonal for the embedding table,
    naive-KFAC factors for the head, the dense diagonal under structure='diag'."""
    model, tokens, y = M.embedding(seed=2)
    x = {"tokens": tokens, "labels": y}
    H, loss = dense_curvature(model, x, y)
    ref = naive_kfac(model, x, y)
    batches = M.dict_loader(tokens, y, 4)
    post = sk.fit_laplace(model, batches, structure="kron")
    assert post.n_data == len(y)
    emb, weight, bias = post.kron_factors
    assert rel_err(emb.reshape(-1), H.diagonal()[: emb.numel()]) < TOL
    assert rel_err(weight[0], ref["head.weight"][0]) < TOL
    assert rel_err(weight[1], ref["head.weight"][1]) < TOL
    assert rel_err(bias[0], ref["head.bias"][0]) < TOL
    diag = sk.fit_laplace(model, batches, structure="diag")
    assert rel_err(diag.curvature_diag(), H.diagonal()) < TOL
    assert float(diag.curvature.loss) == pytest.approx(float(loss), rel=TOL)
    other_key = [{"tokens": b["tokens"], "target": b["labels"]} for b in batches]
    alt = sk.fit_laplace(model, other_key, structure="diag", dict_key_y="target")
    assert rel_err(alt.curvature_diag(), H.diagonal()) < TOL


def test_unsupported_kron_layer_works_under_diag():
    """A Conv1d has no Kronecker factorisation, but its exact diagonal is available."""
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, 3)
    ).double()
    X, y = torch.randn(7, 2, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    H, _ = dense_curvature(model, X, y)
    post = sk.fit_laplace(model, (X, y), structure="diag", batch_size=3)
    assert rel_err(post.curvature_diag(), H.diagonal()) < TOL


def test_frozen_parameters_are_left_out():
    model, X, y = M.mlp(seed=4)
    model[0].weight.requires_grad_(False)
    H, _ = dense_curvature(model, X, y)
    post = sk.fit_laplace(model, (X, y), structure="diag")
    assert post.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rel_err(post.curvature_diag(), H.diagonal()) < TOL


def _curvature_arrays(post) -> list[torch.Tensor]:
    out = []
    for f in post.kron_factors:
        out.extend(f if isinstance(f, tuple) else [f])
    return out


@pytest.mark.parametrize("case", ["mixed", "cnn"])
def test_batch_splitting_and_data_forms_agree(case):
    """Every batch counts: one batch, odd-sized batches, a DataLoader and (X, y) tensors all
    give the same curvature and loss."""
    factory, _ = CASES[case]
    model, X, y = factory(seed=10)
    n = len(y)
    forms = [
        [(X, y)],
        M.loader(X, y, 1),
        M.loader(X, y, 4) + [(X[:0], y[:0])],  # a trailing empty batch adds nothing
        DataLoader(TensorDataset(X, y), batch_size=2, shuffle=False),
        (X, y),
    ]
    model.train()  # fitting evaluates in eval mode (BatchNorm statistics) and restores the mode
    posts = [sk.fit_laplace(model, data, structure="kron", batch_size=3) for data in forms]
    assert model.training
    reference = _curvature_arrays(posts[0])
    for post in posts[1:]:
        assert post.n_data == n
        assert float(post.curvature.loss) == pytest.approx(float(posts[0].curvature.loss), rel=TOL)
        for ours, theirs in zip(_curvature_arrays(post), reference, strict=True):
            assert rel_err(ours, theirs) < TOL


def test_in_memory_tensors_are_batched():
    model, X, y = M.mlp(seed=3, n=13)
    batches = as_batches((X, y), batch_size=4, device=X.device)
    sizes = [len(b[1]) for b in batches]
    assert sizes == [4, 4, 4, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]), X)
    assert all(b[0].device == X.device for b in batches)


def _mc_variance_classification(model, X):
    """Σ_n Var of the per-sample MC-GGN diagonal contribution (J_nᵀ(p − e_y))², y ~ p."""
    f, J = jacobians(model, X)
    p = torch.softmax(f, -1)
    eye = torch.eye(f.shape[1], dtype=f.dtype)
    contrib = torch.einsum("ncp,nyc->nyp", J, p.unsqueeze(1) - eye.unsqueeze(0)).square()
    mean = torch.einsum("ny,nyp->np", p, contrib)
    second = torch.einsum("ny,nyp->np", p, contrib.square())
    return (second - mean.square()).sum(0)


def _mc_variance_regression(model, X):
    """(J_nᵀ v)_i² with v ~ N(0, I) is s²·χ²₁, s² = Σ_c J_ci²: variance 2 s⁴."""
    _, J = jacobians(model, X)
    return (2 * J.square().sum(1).square()).sum(0)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_ggn_is_unbiased(likelihood):
    """The dataset repeated R times gives R independent MC draws per sample; their mean must
    lie within 5 standard deviations (exact variance from the Jacobians) of the exact GGN
    diagonal on every entry. A wrong scale (e.g. a missing or extra factor 2) fails by far."""
    if likelihood == "classification":
        model, X, y = M.mlp(seed=12, n=7, widths=(5,))
        variance = _mc_variance_classification
    else:
        model, X, y = M.regression_mlp(seed=12, n=7, width=5)
        variance = _mc_variance_regression
    reps = 400
    exact = sk.fit_laplace(model, (X, y), likelihood=likelihood, structure="diag")
    gen = torch.Generator().manual_seed(0)
    mc = sk.fit_laplace(
        model,
        (X.repeat(reps, *[1] * (X.ndim - 1)), y.repeat(reps, *[1] * (y.ndim - 1))),
        likelihood=likelihood,
        structure="diag",
        curvature="ggn-mc",
        generator=gen,
        batch_size=700,
    )
    sd = (variance(model, X) / reps).sqrt()
    mean = mc.curvature_diag() / reps
    target = exact.curvature_diag()
    assert bool(((mean - target).abs() <= 5 * sd + 1e-12).all())
    assert float(((mean - target).abs() / target).max()) > 1e-6  # it really was sampled
    # kron: A does not depend on the labels; G is unbiased as well, checked on its trace
    # (sampling error at this R: at most 7 % over seeds 0-4; a wrong factor 2 fails)
    exact_k = sk.fit_laplace(model, (X, y), likelihood=likelihood, structure="kron")
    mc_k = sk.fit_laplace(
        model,
        (X.repeat(reps, *[1] * (X.ndim - 1)), y.repeat(reps, *[1] * (y.ndim - 1))),
        likelihood=likelihood,
        structure="kron",
        curvature="ggn-mc",
        generator=torch.Generator().manual_seed(1),
        batch_size=700,
    )
    for ours, theirs in zip(mc_k.kron_factors, exact_k.kron_factors):
        if len(ours) == 2:
            assert rel_err(ours[1], theirs[1]) < TOL
        assert float(ours[0].trace()) / reps == pytest.approx(float(theirs[0].trace()), rel=0.15)


class _Shared(nn.Module):
    """A Conv2d and a Linear each applied twice: per-sample gradients sum over the calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.conv(torch.tanh(self.conv(x.view(-1, 1, 1, 5)))).view(-1, 5)
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(h)))))


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_module_called_twice_has_the_exact_diagonal(curvature):
    torch.manual_seed(13)
    model = _Shared().double()
    X, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    H, _ = dense_curvature(model, X, y, curvature=curvature)
    post = sk.fit_laplace(model, (X, y), structure="diag", curvature=curvature, batch_size=4)
    assert rel_err(post.curvature_diag(), H.diagonal()) < TOL


def test_float32_model_agrees_with_float64():
    model, X, y = M.cnn(seed=14)
    ref = sk.fit_laplace(model, (X, y), structure="kron", prior="unitwise")
    model32 = model.float()
    post = sk.fit_laplace(model32, (X.float(), y), structure="kron", prior="unitwise")
    assert post.precision_diag().dtype == torch.float32
    assert rel_err(post.precision_diag().double(), ref.precision_diag()) < 1e-5
    lml, lml32 = ref.log_marginal_likelihood().detach(), post.log_marginal_likelihood().detach()
    assert float(lml32) == pytest.approx(float(lml), rel=1e-5)


@pytest.mark.parametrize(
    ("padding", "kernel", "dilation"), [("same", (2, 3), (1, 2)), ("same", 3, 1), ("valid", 2, 1)]
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_string_padding(padding, kernel, dilation):
    """padding='same' may be asymmetric (even kernels): both structures stay exact."""
    torch.manual_seed(15)
    conv = nn.Conv2d(2, 3, kernel, padding=padding, dilation=dilation).double()
    X, y = torch.randn(6, 2, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    width = conv(X)[0].numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3)).double()
    H, _ = dense_curvature(model, X, y)
    ref = naive_kfac(model, X, y)
    diag = sk.fit_laplace(model, (X, y), structure="diag", batch_size=4)
    assert rel_err(diag.curvature_diag(), H.diagonal()) < TOL
    kron = sk.fit_laplace(model, (X, y), structure="kron", batch_size=4)
    for block, factors in zip(kron.blocks, kron.kron_factors):
        for ours, theirs in zip(factors, ref[block.name], strict=True):
            assert rel_err(ours, theirs) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_cuda_matches_cpu(likelihood):
    """float64 on the GPU equals the CPU fit; MC draws from a CPU generator are the same on
    both devices, and a CUDA generator works too."""
    if likelihood == "classification":
        model, X, y = M.cnn(seed=16)
    else:
        model, X, y = M.regression_cnn(seed=16)
    results = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        data = (X.to(device), y.to(device))
        for curvature in ("ggn", "ggn-mc"):
            gen = torch.Generator().manual_seed(3)
            post = sk.fit_laplace(
                m,
                data,
                likelihood=likelihood,
                curvature=curvature,
                prior="unitwise",
                generator=gen,
                batch_size=4,
            )
            results[device, curvature] = (
                [t.cpu() for t in _curvature_arrays(post)],
                float(post.log_marginal_likelihood().detach()),
            )
    for curvature in ("ggn", "ggn-mc"):
        (cpu_arrays, cpu_lml), (gpu_arrays, gpu_lml) = (
            results["cpu", curvature],
            results["cuda", curvature],
        )
        for a, b in zip(gpu_arrays, cpu_arrays, strict=True):
            assert rel_err(a, b) < 1e-8
        assert gpu_lml == pytest.approx(cpu_lml, rel=1e-8)
    gen = torch.Generator(device="cuda").manual_seed(3)
    post = sk.fit_laplace(
        model.to("cuda"),
        (X.cuda(), y.cuda()),
        likelihood=likelihood,
        curvature="ggn-mc",
        generator=gen,
    )
    assert torch.isfinite(post.precision_diag()).all()


def test_fit_under_no_grad_equals_fit_with_grad():
    import spamkern as sk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    X, y = torch.randn(17, 4, dtype=torch.float64), torch.randint(0, 3, (17,))
    with torch.no_grad():
        quiet = sk.fit_laplace(model, (X, y), batch_size=5, progress=False)
    loud = sk.fit_laplace(model, (X, y), batch_size=5, progress=False)
    for a, b in zip(quiet.kron_factors, loud.kron_factors):
        for fa, fb in zip(a, b):
            torch.testing.assert_close(fa, fb, rtol=0, atol=0)


def test_sampled_labels_follow_the_predictive():
    """MC-GGN labels: P(label = k) = p_k per row, including classes of probability 0."""
    from spamkern.curvature.likelihood import _sample_labels

    p = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    reps = 20000
    labels = _sample_labels(p.repeat(reps, 1), torch.Generator().manual_seed(0))
    counts = torch.stack([torch.bincount(labels[i::2], minlength=4) for i in range(2)])
    freq = counts.double() / reps
    sd = (p * (1 - p) / reps).sqrt()
    assert bool(((freq - p).abs() <= 5 * sd + 1e-12).all())
    assert int(labels.max()) <= 3 and int(counts[0, 1]) == 0 and int(counts[1, 3]) == reps


@pytest.mark.parametrize("n_classes", [1, 2, 3, 10])
def test_softmax_hessian_root_has_rank_many_vectors(n_classes):
    """C − 1 vectors whose outer products sum to diag(p) − p pᵀ, for ordinary, saturated
    (a class at probability 1, or the pivot class at 0) and uniform predictions."""
    from spamkern.curvature.likelihood import softmax_hessian_root

    f = torch.randn(6, n_classes, dtype=torch.float64) * 3
    f[1, 0] = 60.0  # class 0 takes all the mass
    f[2, -1] = -60.0  # the pivot class has probability ~0
    f[3] = 0.0  # uniform
    p = torch.softmax(f, -1)
    V = softmax_hessian_root(p)
    assert V.shape == (6, max(1, n_classes - 1), n_classes)
    hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(V.mT @ V, hessian, rtol=0, atol=1e-15)
    # in float32, a few rounding units of the Hessian's largest entry
    root32 = softmax_hessian_root(p.float()).double()
    bound = 4 * torch.finfo(torch.float32).eps * float(hessian.abs().max())
    assert float((root32.mT @ root32 - hessian).abs().max()) <= bound
