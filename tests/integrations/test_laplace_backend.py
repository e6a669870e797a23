"""laplace-torch with spamkern as its curvature backend: laplace-torch's own invariants.

Every comparison is float64 against laplace-torch's Curvlinops/ASDL backends or against a
direct formula (the exact GGN through torch.func), on fresh random data with odd sizes.
Each backend gets its own deep copy of the model: the ASDL backends fail on a model that
another backend's hooks have touched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace  # noqa: E402
from laplace.curvature import AsdlEF, AsdlGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402
from laplace.curvature.curvature import GGNInterface  # noqa: E402
from laplace.marglik_training import marglik_training  # noqa: E402
from laplace.utils.enums import Likelihood  # noqa: E402

from spamkern.integrations.laplace import SpamkernEF, SpamkernGGN, SpamkernGGNMC  # noqa: E402

DT = torch.float64
RTOL = 1e-8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def mlp(seed: int, n_in: int = 5, n_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_in, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, n_out)
    ).to(DT)


def cnn(seed: int, n_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, n_out),
    ).to(DT)


def data(kind: str, likelihood: str, n: int, seed: int, n_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    X = (
        torch.randn(n, 5, generator=g, dtype=DT)
        if kind == "mlp"
        else torch.randn(n, 2, 7, 7, generator=g, dtype=DT)
    )
    if likelihood == "classification":
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DT)
    return X, y


def loader(X, y, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def fitted(cls, model, likelihood, backend, dl, **kwargs):
    la = cls(copy.deepcopy(model), likelihood, backend=backend, **kwargs)
    la.fit(dl)
    return la


def precision_diag(la) -> torch.Tensor:
    P = la.posterior_precision
    return P.diag() if isinstance(la, KronLaplace) else P


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    "ours,ref", [(SpamkernGGN, CurvlinopsGGN), (SpamkernEF, CurvlinopsEF)], ids=["ggn", "ef"]
)
@pytest.mark.parametrize("cls", [KronLaplace, DiagLaplace])
def test_matches_curvlinops(kind, likelihood, ours, ref, cls):
    """Same log marglik, precision diagonal and GLM predictive as laplace-torch's default."""
    model = mlp(1) if kind == "mlp" else cnn(1)
    X, y = data(kind, likelihood, 29, seed=2)
    dl = loader(X, y, batch_size=11)
    sigma = 0.7 if likelihood == "regression" else 1.0
    kwargs = dict(prior_precision=0.4, sigma_noise=sigma, temperature=0.9)
    a = fitted(cls, model, likelihood, ours, dl, **kwargs)
    b = fitted(cls, model, likelihood, ref, dl, **kwargs)
    assert a.n_data == b.n_data == 29
    assert rel(torch.as_tensor(a.loss), torch.as_tensor(b.loss)) < RTOL
    assert rel(precision_diag(a), precision_diag(b)) < RTOL
    assert rel(a.log_marginal_likelihood(), b.log_marginal_likelihood()) < RTOL
    # at other (per-layer) precisions and σ, as marglik_training evaluates it
    prec = torch.rand(a.n_layers, dtype=DT, generator=torch.Generator().manual_seed(3)) + 0.1
    s = torch.tensor(1.3, dtype=DT) if likelihood == "regression" else None
    assert rel(a.log_marginal_likelihood(prec, s), b.log_marginal_likelihood(prec, s)) < RTOL
    Xt = X[:6] + 0.1
    mu_a, var_a = a._glm_predictive_distribution(Xt)
    mu_b, var_b = b._glm_predictive_distribution(Xt)
    assert rel(mu_a, mu_b) < RTOL and rel(var_a, var_b) < RTOL
    if likelihood == "classification":
        assert (
            rel(
                a(Xt, pred_type="glm", link_approx="probit"),
                b(Xt, pred_type="glm", link_approx="probit"),
            )
            < RTOL
        )


def test_kron_factors_match_asdl_factor_by_factor():
    """Classification GGN factors (not only their products) equal ASDL's."""
    model = mlp(4)
    X, y = data("mlp", "classification", 17, seed=5)
    a = fitted(KronLaplace, model, "classification", SpamkernGGN, loader(X, y, 17))
    b = fitted(KronLaplace, model, "classification", AsdlGGN, loader(X, y, 17))
    for fa, fb in zip(a.H_facs.kfacs, b.H_facs.kfacs):
        assert len(fa) == len(fb)
        for x, z in zip(fa, fb):
            assert rel(x, z) < RTOL


@pytest.mark.parametrize("backend", [SpamkernGGN, SpamkernEF])
def test_batch_splitting_invariance(backend):
    """Kron factors and diagonals do not depend on how the data is batched."""
    model = cnn(6)
    X, y = data("cnn", "classification", 23, seed=7)
    whole = fitted(KronLaplace, model, "classification", backend, loader(X, y, 23))
    split = fitted(KronLaplace, model, "classification", backend, loader(X, y, 4))
    assert rel(torch.as_tensor(whole.loss), torch.as_tensor(split.loss)) < 1e-12
    for fa, fb in zip(whole.H_facs.kfacs, split.H_facs.kfacs):
        for x, z in zip(fa, fb):
            assert rel(x, z) < 1e-12
    dw = fitted(DiagLaplace, model, "classification", backend, loader(X, y, 23))
    ds = fitted(DiagLaplace, model, "classification", backend, loader(X, y, 5))
    assert rel(dw.H, ds.H) < 1e-12


def _kron_blocks(la: KronLaplace) -> list[torch.Tensor]:
    out = []
    for facs in la.H_facs.kfacs:
        out.append(torch.kron(facs[0], facs[1]) if len(facs) == 2 else facs[0])
    return out


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_repeated_point_kron_is_exact_ggn(likelihood):
    """N copies of one point: Kron factors normalise to exactly N × the single-point GGN.

    For one point a Linear layer's GGN block is exactly G ⊗ A; the reference is the dense
    GGN from laplace-torch's torch.func Jacobians (GGNInterface.full), block by block. Its
    diagonal is then also the exact diagonal GGN (Kron vs diag).
    """
    model = mlp(8)
    X1, y1 = data("mlp", likelihood, 1, seed=9)
    n = 13
    X, y = X1.expand(n, -1).clone(), y1.expand(n, *y1.shape[1:]).clone()
    la = fitted(KronLaplace, model, likelihood, SpamkernGGN, loader(X, y, 5))
    ref = GGNInterface(copy.deepcopy(model), likelihood)
    _, H = ref.full(X, y)
    offset = 0
    for block in _kron_blocks(la):
        size = block.shape[0]
        assert rel(block, H[offset : offset + size, offset : offset + size]) < RTOL
        offset += size
    diag = fitted(DiagLaplace, model, likelihood, SpamkernGGN, loader(X, y, 5))
    assert rel(diag.H, H.diagonal()) < RTOL
    assert rel(torch.cat([b.diagonal() for b in _kron_blocks(la)]), diag.H) < RTOL
    # on generic data Kron is an approximation: the same comparison must fail there
    Xg, yg = data("mlp", likelihood, n, seed=10)
    lg = fitted(KronLaplace, model, likelihood, SpamkernGGN, loader(Xg, yg, 5))
    dg = fitted(DiagLaplace, model, likelihood, SpamkernGGN, loader(Xg, yg, 5))
    assert rel(torch.cat([b.diagonal() for b in _kron_blocks(lg)]), dg.H) > 1e-3


def test_full_laplace_and_last_layer_use_the_backend():
    """FullLaplace (inherited dense GGN) and last-layer Kron agree with Curvlinops."""
    model = mlp(11)
    X, y = data("mlp", "classification", 19, seed=12)
    dl = loader(X, y, 7)
    a = fitted(FullLaplace, model, "classification", SpamkernGGN, dl, prior_precision=2.0)
    b = fitted(FullLaplace, model, "classification", CurvlinopsGGN, dl, prior_precision=2.0)
    assert rel(a.log_marginal_likelihood(), b.log_marginal_likelihood()) < RTOL
    las = []
    for backend in (SpamkernGGN, CurvlinopsGGN):
        la = Laplace(
            copy.deepcopy(model),
            "classification",
            subset_of_weights="last_layer",
            hessian_structure="kron",
            backend=backend,
            prior_precision=0.5,
        )
        la.fit(dl)
        las.append(la)
    assert rel(las[0].log_marginal_likelihood(), las[1].log_marginal_likelihood()) < RTOL
    assert rel(las[0].posterior_precision.diag(), las[1].posterior_precision.diag()) < RTOL


@pytest.mark.parametrize(
    "likelihood,ours,ref",
    [
        ("classification", SpamkernGGN, CurvlinopsGGN),
        ("regression", SpamkernGGN, CurvlinopsGGN),
        ("classification", SpamkernEF, AsdlEF),
    ],
    ids=["classification-ggn", "regression-ggn", "classification-ef"],
)
def test_marglik_training_end_to_end(likelihood, ours, ref):
    """laplace-torch's marglik_training runs with the spamkern backend and learns the same
    hyperparameters as with its own backends (training itself does not depend on them)."""
    model = mlp(13)
    X, y = data("mlp", likelihood, 31, seed=14)
    likelihood = Likelihood(likelihood)  # what marglik_training passes on by default
    runs = []
    for backend in (ours, ref):
        torch.manual_seed(0)
        la, _, margliks, losses = marglik_training(
            copy.deepcopy(model),
            loader(X, y, 10),
            likelihood=likelihood,
            backend=backend,
            n_epochs=3,
            n_hypersteps=5,
            optimizer_kwargs={"lr": 1e-2},
            prior_structure="layerwise",
        )
        runs.append((la, torch.tensor(margliks, dtype=DT), torch.tensor(losses, dtype=DT)))
    (a, ma, la_), (b, mb, lb) = runs
    assert ma.numel() == 15 and torch.isfinite(ma).all()
    assert rel(la_, lb) < RTOL and rel(ma, mb) < RTOL
    assert rel(a.prior_precision, b.prior_precision) < RTOL
    assert (
        rel(torch.as_tensor(a.sigma_noise, dtype=DT), torch.as_tensor(b.sigma_noise, dtype=DT))
        < RTOL
    )
    assert rel(a.log_marginal_likelihood(), b.log_marginal_likelihood()) < RTOL


def test_mc_ggn_is_unbiased_and_seeded():
    """The MC-GGN averages to the exact GGN; draws follow torch's global seed.

    Every point is repeated ``copies`` times, so one pass averages that many label draws
    per point (and ``num_samples=2`` two passes); G/copies must approach the exact G.
    """
    model = mlp(15)
    X, y = data("mlp", "classification", 9, seed=16)
    exact = SpamkernGGN(copy.deepcopy(model), "classification")
    _, K = exact.kron(X, y, N=9)
    copies = 1000
    Xr, yr = X.repeat(copies, 1), y.repeat(copies)
    mc = SpamkernGGN(copy.deepcopy(model), "classification", stochastic=True, num_samples=2)
    torch.manual_seed(0)
    _, Kmc = mc.kron(Xr, yr, N=9 * copies)
    for fe, fm in zip(K.kfacs, Kmc.kfacs):
        assert rel(fm[0] / copies, fe[0]) < 0.05  # Monte Carlo error ~ 1/√2000 relative
        if len(fe) == 2:
            assert rel(fm[1], fe[1]) < 1e-12  # A does not depend on the labels
    one = SpamkernGGNMC(copy.deepcopy(model), "classification")
    torch.manual_seed(17)
    _, K1 = one.kron(X, y, N=9)
    torch.manual_seed(17)
    _, K2 = one.kron(X, y, N=9)
    assert rel(K1.kfacs[0][0], K2.kfacs[0][0]) == 0.0
    assert rel(K1.kfacs[0][0], K.kfacs[0][0]) > 1e-2


def test_refusals_name_the_problem():
    model = mlp(18)
    X, y = data("mlp", "classification", 5, seed=19)
    backend = SpamkernGGN(model, "classification")
    with pytest.raises(TypeError, match="kfac_approx"):
        backend.kron(X, y, N=5, mc_samples=3)
    with pytest.raises(ValueError, match="kfac_approx"):
        backend.kron(X, y, N=5, kfac_approx="reduce")
    sub = SpamkernGGN(model, "classification", subnetwork_indices=torch.arange(4))
    with pytest.raises(ValueError, match="SubnetLaplace"):
        sub.diag(X, y, N=5)

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(5, 3, dtype=DT))
            self.out = nn.Linear(5, 3).to(DT)

        def forward(self, x):
            return self.out(x) + x[:, :3] @ self.table[:3]

    with pytest.raises(ValueError, match="'table'"):
        SpamkernGGN(WithTable(), "classification").kron(X, y, N=5)


def test_layernorm_gets_its_exact_diagonal_in_kron():
    """A 1-D tensor outside Linear/Conv2d: its Kron block is diag(exact GGN diagonal)."""
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = data("mlp", "classification", 11, seed=21)
    _, K = SpamkernGGN(model, "classification").kron(X, y, N=11)
    _, H = GGNInterface(copy.deepcopy(model), "classification").full(X, y)
    ln_offset = 5 * 6 + 6
    for j, size in ((2, 6), (3, 6)):  # LayerNorm weight, bias
        block = K.kfacs[j][0]
        assert rel(block, torch.diag(block.diagonal())) == 0.0
        assert rel(block.diagonal(), H.diagonal()[ln_offset : ln_offset + size]) < RTOL
        ln_offset += size


class DictModel(nn.Module):
    """A model fed dict batches, as Hugging Face models are (targets under "labels")."""

    def __init__(self):
        super().__init__()
        self.body = mlp(22)

    def forward(self, batch):
        return self.body(batch["input_ids"])


def test_dict_batches():
    X, y = data("mlp", "classification", 14, seed=23)
    batches = [{"input_ids": X[i : i + 5], "labels": y[i : i + 5]} for i in range(0, 14, 5)]

    class DictLoader(list):
        dataset = range(14)

    las = []
    for backend in (SpamkernGGN, CurvlinopsGGN):
        torch.manual_seed(0)
        la = KronLaplace(DictModel(), "classification", backend=backend, prior_precision=0.3)
        la.fit(DictLoader(batches))
        las.append(la)
    assert rel(las[0].log_marginal_likelihood(), las[1].log_marginal_likelihood()) < RTOL
    assert rel(precision_diag(las[0]), precision_diag(las[1])) < RTOL


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [SpamkernGGN, SpamkernEF])
def test_on_cuda_matches_cpu_reference(backend):
    """The backend on a GPU (float64) against laplace-torch's Curvlinops backend on the CPU."""
    model = cnn(24)
    X, y = data("cnn", "classification", 33, seed=25)
    ref = CurvlinopsGGN if backend is SpamkernGGN else CurvlinopsEF
    b = fitted(KronLaplace, model, "classification", ref, loader(X, y, 8), prior_precision=0.6)
    a = fitted(KronLaplace, model.cuda(), "classification", backend, loader(X.cuda(), y.cuda(), 8),
               prior_precision=0.6)  # fmt: skip
    assert rel(a.log_marginal_likelihood().cpu(), b.log_marginal_likelihood()) < RTOL
    assert rel(precision_diag(a).cpu(), precision_diag(b)) < RTOL


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("backend_cls", [SpamkernGGN, SpamkernEF], ids=["ggn", "ef"])
def test_backend_level_invariants(likelihood, backend_cls):
    """laplace-torch's own curvature-suite checks, on the backend's kron/diag directly:
    summing up over batches, 7 × one point = the point repeated 7 times (normalisation),
    and diag = the diagonal of the dense curvature (laplace-torch's torch.func ``full``)."""
    model = cnn(26)
    X, y = data("cnn", likelihood, 10, seed=27)
    backend = backend_cls(model, likelihood)
    n, m = len(X), 3
    loss, kron = backend.kron(X, y, N=n)
    loss1, kron1 = backend.kron(X[:m], y[:m], N=n)
    loss2, kron2 = backend.kron(X[m:], y[m:], N=n)
    assert rel(kron.diag(), (kron1 + kron2).diag()) < RTOL
    assert rel(loss, loss1 + loss2) < RTOL
    loss_d, diag = backend.diag(X, y, N=n)
    loss_d1, diag1 = backend.diag(X[:m], y[:m], N=n)
    loss_d2, diag2 = backend.diag(X[m:], y[m:], N=n)
    assert rel(diag, diag1 + diag2) < RTOL and rel(loss_d, loss_d1 + loss_d2) < RTOL

    xi, yi = X[:1], y[:1]
    loss_1, kron_1 = backend.kron(xi, yi, N=1)
    loss_7, kron_7 = backend.kron(xi.repeat_interleave(7, 0), yi.repeat_interleave(7, 0), N=7)
    assert rel((7 * kron_1).diag(), kron_7.diag()) < RTOL
    assert rel(7 * loss_1, loss_7) < RTOL

    loss_f, full = backend.full(X, y)
    assert rel(loss_d, loss_f) < RTOL
    assert rel(diag, full.diagonal()) < RTOL


def test_float32_and_no_grad_context():
    """A float32 fit (inside torch.no_grad, which the pass must override) is within float32
    accuracy of the float64 one."""
    model = cnn(28)
    X, y = data("cnn", "classification", 21, seed=29)
    ref = fitted(KronLaplace, model, "classification", SpamkernGGN, loader(X, y, 8))
    la = KronLaplace(copy.deepcopy(model).float(), "classification", backend=SpamkernGGN)
    with torch.no_grad():
        la.fit(loader(X.float(), y, 8))
    assert la.posterior_precision.diag().dtype == torch.float32
    assert rel(la.posterior_precision.diag().double(), precision_diag(ref)) < 1e-5
    assert rel(la.log_marginal_likelihood().double(), ref.log_marginal_likelihood()) < 1e-5
