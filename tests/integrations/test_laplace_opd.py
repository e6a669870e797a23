"""OPD scores and pruning straight from fitted laplace-torch posteriors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("laplace")

from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN  # noqa: E402

import spamkern as sk  # noqa: E402
from spamkern.integrations.laplace import SpamkernGGN, from_laplace  # noqa: E402

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def setup(seed: int, likelihood: str = "classification"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 3)).to(DT)
    X = torch.randn(27, 4, dtype=DT)
    y = (
        torch.randint(0, 3, (27,))
        if likelihood == "classification"
        else torch.randn(27, 3, dtype=DT)
    )
    return model, DataLoader(TensorDataset(X, y), batch_size=10), (X, y)


@pytest.mark.parametrize("cls", [KronLaplace, DiagLaplace, FullLaplace])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_opd_scores_from_laplace_torch(cls, likelihood):
    """sk.opd_scores(la) = ½ θ² diag(laplace-torch's posterior precision), per-layer prior."""
    model, dl, _ = setup(1, likelihood)
    prior = torch.tensor([0.3, 2.0, 0.7, 1.5], dtype=DT)
    kwargs = dict(prior_precision=prior, temperature=0.8)
    if likelihood == "regression":
        kwargs["sigma_noise"] = 0.6
    la = cls(copy.deepcopy(model), likelihood, backend=CurvlinopsGGN, **kwargs)
    la.fit(dl)
    P = la.posterior_precision
    diag = P.diag() if cls is KronLaplace else (P.diagonal() if cls is FullLaplace else P)
    expected = 0.5 * la.mean.square() * diag
    post = from_laplace(la)
    assert rel(post.precision_diag(), diag) < 1e-10
    assert rel(sk.opd_scores(post), expected) < 1e-10
    assert rel(sk.opd_scores(la), expected) < 1e-10  # the registered adapter
    as_dict = sk.opd_scores(la, as_dict=True)
    assert as_dict["0.weight"].shape == (9, 4)


def test_opd_from_laplace_torch_matches_spamkern_fit():
    """The same posterior fitted by spamkern gives the same OPD scores and masks."""
    model, dl, (X, y) = setup(2)
    la = KronLaplace(
        copy.deepcopy(model), "classification", backend=SpamkernGGN, prior_precision=0.9
    )
    la.fit(dl)
    post = sk.fit_laplace(
        model, (X, y), structure="kron", prior="layerwise", prior_precision=0.9, progress=False
    )
    ours = sk.opd_scores(post)
    theirs = sk.opd_scores(la)
    assert rel(theirs, ours) < 1e-10
    masks_a = sk.prune(la.model, theirs, sparsity=0.6)
    masks_b = sk.prune(model, ours, sparsity=0.6)
    for name, m in dict(masks_b).items():
        assert torch.equal(dict(masks_a)[name], m)


def test_ef_posterior_and_refusals():
    model, dl, _ = setup(3)
    la = DiagLaplace(copy.deepcopy(model), "classification", backend=CurvlinopsEF)
    with pytest.raises(ValueError, match="not fitted"):
        from_laplace(la)
    la.fit(dl)
    assert rel(from_laplace(la).precision_diag(), la.posterior_precision) < 1e-12
    ll = Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="diag",
    )
    ll.fit(dl)
    with pytest.raises(TypeError, match="subset_of_weights='all'"):
        from_laplace(ll)
    with pytest.raises(TypeError):
        from_laplace(object())
