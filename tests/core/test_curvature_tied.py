"""Tied weights (one tensor held by several modules): the curvature counts every use.

The per-sample Jacobian of a tied weight is the sum of its uses' Jacobians, J = J1 + J2, so
its GGN diagonal is diag((J1 + J2)ᵀ Λ (J1 + J2)) — not the sum of the two uses' diagonals.
The reference is built from an *untied* copy of the model (same values, separate tensors)
by adding the two uses' Jacobian columns. Under structure="kron" a tied weight has no
Kronecker factorisation of the usual kind and gets this exact diagonal block.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spamkern as sk

from .dense import jacobians, naive_kfac, output_hessian_roots, rel_err

TOL = 1e-10


class TiedNet(nn.Module):
    """``l2.weight = l1.weight`` (each layer keeps its own bias)."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        if tie:
            self.l2.weight = self.l1.weight

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class TiedEmbeddingNet(nn.Module):
    """A language-model style tied embedding and read-out (``head.weight = emb.weight``)."""

    def __init__(self, vocab: int = 7, dim: int = 4, tie: bool = True):
        super().__init__()
        self.emb, self.mix = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens).mean(1))))


def _data(seed: int, tied: type[nn.Module], x_of):
    """The tied model, an untied copy holding the same values, inputs and labels."""
    torch.manual_seed(seed)
    model = tied().double()
    untied = tied(tie=False).double()
    untied.load_state_dict(model.state_dict())  # the tied value lands in both places
    gen = torch.Generator().manual_seed(seed + 1)
    X = x_of(gen)
    outputs = model(X)
    y = torch.randint(0, outputs.shape[1], (len(X),), generator=gen)
    assert torch.equal(untied(X), outputs)
    return model, untied, X, y


def _tied_dense_ggn(model, untied, X, y, tied_pairs: list[tuple[str, str]]):
    """Dense GGN of the tied model from the untied copy: the tied tensor's Jacobian columns
    are the sum of its uses' columns; the result is in the tied model's parameter order."""
    _, J = jacobians(untied, X)
    names = [n for n, _ in untied.named_parameters()]
    sizes = [p.numel() for _, p in untied.named_parameters()]
    starts = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    cols = {n: J[..., starts[n] : starts[n] + s] for n, s in zip(names, sizes)}
    for first, second in tied_pairs:
        cols[first] = cols[first] + cols.pop(second)
    order = [n for n, _ in model.named_parameters()]
    J_tied = torch.cat([cols[n] for n in order], dim=-1)
    f = untied(X).detach()
    Lr = output_hessian_roots("classification", "ggn", f, y)
    JL = J_tied.transpose(1, 2) @ Lr
    return torch.einsum("npk,nqk->pq", JL, JL)


CASES = {
    "linear": (
        TiedNet,
        lambda g: torch.randn(9, 5, generator=g, dtype=torch.float64),
        [("l1.weight", "l2.weight")],
    ),
    "embedding": (
        TiedEmbeddingNet,
        lambda g: torch.randint(0, 7, (8, 3), generator=g),
        [("emb.weight", "head.weight")],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tied_weight_diagonal_counts_every_use(case):
    cls, x_of, pairs = CASES[case]
    model, untied, X, y = _data(0, cls, x_of)
    H = _tied_dense_ggn(model, untied, X, y, pairs)
    diag = sk.fit_laplace(model, (X, y), structure="diag", batch_size=4, progress=False)
    assert rel_err(diag.curvature_diag(), H.diagonal()) < TOL
    kron = sk.fit_laplace(model, (X, y), structure="kron", batch_size=4, progress=False)
    ref = naive_kfac(untied, X, y)
    for block, factors in zip(kron.blocks, kron.kron_factors, strict=True):
        sl = slice(block.offset, block.offset + block.numel)
        if block.name == pairs[0][0]:  # the tied tensor: its exact diagonal block
            assert isinstance(factors, torch.Tensor)
            assert rel_err(factors.reshape(-1), H.diagonal()[sl]) < TOL
        elif block.name in ref:  # every other Linear tensor: its usual factors
            for ours, theirs in zip(factors, ref[block.name], strict=True):
                assert rel_err(ours, theirs) < TOL
    # the evidence stays exact for the mixed blocks
    post = kron
    dense = post.curvature_scale * torch.block_diag(
        *[
            torch.diag(f.reshape(-1))
            if isinstance(f, torch.Tensor)
            else (torch.kron(*f) if len(f) == 2 else f[0])
            for f in post.kron_factors
        ]
    ) + torch.diag(post.prior.precision_diag().detach())
    assert float(post.log_det_posterior_precision().detach()) == pytest.approx(
        float(torch.linalg.slogdet(dense)[1]), rel=1e-8
    )


def test_tied_weight_diagonal_matches_laplace_torch():
    from laplace import DiagLaplace
    from laplace.curvature import CurvlinopsGGN

    model, _, X, y = _data(1, TiedNet, CASES["linear"][1])
    la = DiagLaplace(copy.deepcopy(model), "classification", backend=CurvlinopsGGN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(DataLoader(TensorDataset(X, y), batch_size=4))
    post = sk.fit_laplace(model, (X, y), structure="diag", batch_size=4, progress=False)
    assert rel_err(post.curvature_diag(), la.H) < 1e-8
