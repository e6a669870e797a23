"""OBS saliency, prior score and the Kronecker cost against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import DiagPosterior, classification_data, make_cnn, make_mlp
from torch import nn

import spamkern as sk
from spamkern.pruning import kron_cost, kron_masks, obs_scores, prior_scores

PRIORS = ("scalar", "layerwise", "unitwise", "parameterwise")


def _perturbed_fit(model, data, prior, structure="kron"):
    post = sk.fit_laplace(model, data, prior=prior, structure=structure, progress=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # distinct precisions per hyperparameter, so the layouts matter
        lp = post.prior.log_precision
        lp.add_(0.5 * torch.randn(lp.shape, generator=g, dtype=lp.dtype))
    return post


def _dense_precision(post) -> torch.Tensor:
    """Block-diagonal Π = s·(G ⊗ A | G | diag h) + diag δ as one dense (P, P) matrix."""
    s = post.curvature_scale
    blocks = []
    for facs in post.curvature.block_factors():
        if isinstance(facs, torch.Tensor):
            blocks.append(torch.diag(facs.reshape(-1)))
        elif len(facs) == 2:
            blocks.append(torch.kron(facs[0], facs[1]))
        else:
            blocks.append(facs[0])
    return s * torch.block_diag(*blocks) + torch.diag(post.prior.precision_diag().detach())


@pytest.fixture(scope="module")
def cnn_data():
    return make_cnn(), classification_data(24, (2, 6, 6), 4)


@pytest.mark.parametrize("prior", ("scalar", "layerwise", "unitwise"))
def test_obs_matches_dense_inverse_kron(cnn_data, prior):
    model, data = cnn_data
    post = _perturbed_fit(model, data, prior)
    cov = torch.linalg.inv(_dense_precision(post)).diagonal()
    expected = 0.5 * post.mean.square() / cov
    torch.testing.assert_close(obs_scores(post), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("prior", PRIORS)
def test_obs_matches_dense_inverse_diag(prior):
    model = make_mlp()
    post = _perturbed_fit(model, classification_data(30, (7,), 3), prior, structure="diag")
    cov = torch.linalg.inv(_dense_precision(post)).diagonal()
    torch.testing.assert_close(obs_scores(post), 0.5 * post.mean.square() / cov)


def test_obs_parameterwise_kron_uses_posterior_covariance(cnn_data):
    model, data = cnn_data
    post = _perturbed_fit(model, data, "parameterwise")
    expected = 0.5 * post.mean.square() / post.covariance_diag()
    torch.testing.assert_close(obs_scores(post), expected)


@pytest.mark.parametrize("prior", PRIORS)
def test_prior_score_is_half_delta_theta_squared(cnn_data, prior):
    model, data = cnn_data
    post = _perturbed_fit(model, data, prior)
    got = prior_scores(post, as_dict=True)
    delta = post.prior.precision_diag().detach()
    expected = sk.pruning.scores.scores_to_dict(model, 0.5 * delta * post.mean.square())
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value)


def test_obs_refuses_posterior_without_covariance():
    model = make_mlp()
    n = sum(p.numel() for p in model.parameters())

    class PrecisionOnly:
        def __init__(self):
            self.model = model
            self.mean = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def precision_diag(self):
            return torch.ones(n, dtype=torch.float64)

    with pytest.raises(TypeError, match="covariance diagonal"):
        obs_scores(PrecisionOnly())


def _random_masks(model, frac, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) > frac
        for n, p in model.named_parameters()
        if n != "8.weight"
    }


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("structure", ("kron", "diag"))
def test_kron_cost_matches_dense_quadratic_form(cnn_data, prior, structure):
    model, data = cnn_data
    post = _perturbed_fit(model, data, prior, structure)
    masks = _random_masks(model, 0.6, seed=5)
    full = {n: masks.get(n, torch.ones(p.shape, dtype=torch.bool)) for n, p in post.named_params}
    keep = torch.cat([full[n].reshape(-1) for n, _ in post.named_params])
    delta = torch.where(keep, torch.zeros_like(post.mean), -post.mean)
    expected = 0.5 * delta @ _dense_precision(post) @ delta
    torch.testing.assert_close(kron_cost(post, masks), expected)


def _relu_mean_model():
    """ReLU inputs with a large mean: the cross terms OPD drops dominate the cost."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3)
    ).double()


@pytest.mark.parametrize(
    "prior,pattern,sparsity",
    [(p, "unstructured", 0.7) for p in PRIORS] + [("unitwise", "block", 0.5)],
)
def test_kron_masks_never_costlier_than_opd(prior, pattern, sparsity):
    model = _relu_mean_model()
    x, y = classification_data(80, (6,), 3)
    post = _perturbed_fit(model, (x + 1.5, y), prior)
    masks = kron_masks(post, sparsity, pattern=pattern, rounds=8, block=(2, 2))
    opd = sk.prune(model, sk.opd_scores(post), sparsity, pattern=pattern, block=(2, 2))
    assert masks.sparsity() == pytest.approx(opd.sparsity())
    assert set(masks) == set(opd)
    assert float(kron_cost(post, masks)) <= float(kron_cost(post, opd)) + 1e-12


def test_kron_masks_sees_the_cross_terms():
    """On ReLU inputs with a large mean the rounds find a strictly cheaper mask than OPD."""
    model = _relu_mean_model()
    x, y = classification_data(80, (6,), 3)
    post = sk.fit_laplace(model, (x + 1.5, y), prior="layerwise", progress=False)
    masks = kron_masks(post, 0.8, rounds=16)
    opd = sk.prune(model, sk.opd_scores(post), 0.8)
    assert float(kron_cost(post, masks)) < 0.97 * float(kron_cost(post, opd))


def test_kron_masks_on_diag_posterior_equals_opd():
    model = make_mlp()
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    post = DiagPosterior(
        model,
        torch.rand(n, generator=g, dtype=torch.float64),
        torch.rand(n, generator=g, dtype=torch.float64),
        0.5,
    )
    masks = kron_masks(post, 0.6, rounds=4)
    opd = sk.prune(model, sk.opd_scores(post), 0.6)
    for name in opd:
        assert torch.equal(masks[name], opd[name])


def test_kron_masks_rejects_bad_rounds(cnn_data):
    model, data = cnn_data
    post = sk.fit_laplace(model, data, progress=False)
    with pytest.raises(ValueError, match="rounds"):
        kron_masks(post, 0.5, rounds=0)


# ---------------------------------------------------------------------------- laplace-torch
def _laplace_pair(structure):
    from laplace import DiagLaplace, KronLaplace

    from spamkern.integrations.laplace import SpamkernGGN

    model = make_mlp()
    x, y = classification_data(40, (7,), 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    cls = KronLaplace if structure == "kron" else DiagLaplace
    la = cls(model, "classification", prior_precision=0.7, backend=SpamkernGGN)
    la.fit(loader, progress_bar=False)
    ours = sk.fit_laplace(
        model, (x, y), structure=structure, prior="scalar", prior_precision=0.7, progress=False
    )
    return la, ours


@pytest.mark.parametrize("structure", ("kron", "diag"))
def test_scores_read_laplace_torch_posteriors(structure):
    la, ours = _laplace_pair(structure)
    torch.testing.assert_close(obs_scores(la), obs_scores(ours))
    torch.testing.assert_close(prior_scores(la), prior_scores(ours))
    masks = _random_masks(ours.model, 0.5, seed=1)
    torch.testing.assert_close(kron_cost(la, masks), kron_cost(ours, masks))


def test_unit_cost_is_the_compensated_kronecker_cost():
    """Removing unit u (columns C) of the next layer's input, the rest re-fitted by least
    squares: ½ s·tr(G ΔW A ΔWᵀ) at the optimum equals ½ s·tr(G W_C [A⁻¹]_CC⁻¹ W_Cᵀ)."""
    from spamkern.pruning.saliency import _remove_units, _unit_costs

    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 12, generator=g, dtype=torch.float64).relu() + 0.1
    A = X.T @ X / 50
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    G = M @ M.T
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    cols, s = 3, 0.7
    Sigma = torch.linalg.inv(A)
    alive = torch.ones(4, dtype=torch.bool)
    got = _unit_costs(s, G, Sigma, W, cols, alive)
    for u in range(4):
        C = torch.zeros(12, dtype=torch.bool)
        C[u * cols : (u + 1) * cols] = True
        B = torch.linalg.solve(A[~C][:, ~C], A[~C][:, C])  # a_C ≈ Bᵀ a_K
        W_new = torch.zeros_like(W)
        W_new[:, ~C] = W[:, ~C] + W[:, C] @ B.T
        D = W_new - W
        torch.testing.assert_close(got[u], 0.5 * s * torch.trace(G @ D @ A @ D.T))
    Sigma2, W2 = _remove_units(Sigma, W.clone(), cols, torch.tensor([1]))
    K = torch.ones(12, dtype=torch.bool)
    K[3:6] = False
    torch.testing.assert_close(Sigma2[K][:, K], torch.linalg.inv(A[K][:, K]))
    B = torch.linalg.solve(A[K][:, K], A[K][:, ~K])
    torch.testing.assert_close(W2[:, K], W[:, K] + W[:, ~K] @ B.T)


@pytest.mark.parametrize("scope", ("global", "layerwise"))
def test_kron_unit_masks_counts_and_keep_a_unit_per_layer(cnn_data, scope):
    model, data = cnn_data
    post = sk.fit_laplace(model, data, prior="unitwise", progress=False)
    masks = kron_masks(post, 0.6, pattern="unit", scope=scope)
    opd = sk.prune(model, sk.opd_scores(post), 0.6, pattern="unit", scope=scope)
    assert set(masks) == set(opd)
    assert masks.pattern == "unit"
    assert masks.sparsity() == pytest.approx(opd.sparsity())
    for m in masks.values():
        if m.ndim > 1:
            rows = m.reshape(m.shape[0], -1)
            assert bool((rows.all(1) == rows.any(1)).all()) and bool(rows.any())
