"""The new Kronecker layers against laplace-torch, through models it does support.

laplace-torch has no Conv1d, per-group or attention KFAC, but each of these layers computes
exactly what a model it supports computes: a Conv1d is a Conv2d over a height-1 input; a
grouped Conv2d is one Conv2d per group on the group's channels, concatenated; attention is
four nn.Linear layers around a softmax. spamkern's factors (per group / per q, k, v slice)
must equal laplace-torch's (curvlinops backend, "expand" KFAC) on the equivalent model, and
so must the log marginal likelihood and posterior precision diagonal (random per-tensor
hyperparameters, T ≠ 1), with the equivalent model's tensors given the same precisions.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from laplace import KronLaplace
from laplace.curvature import CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spamkern as sk

from . import layers as L
from .dense import rel_err

TOL = 1e-8
T = 0.7
F64 = torch.float64


class Conv1dAs2d(nn.Module):
    """A Conv1d computed by a Conv2d over a height-1 input."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            (1, *conv.kernel_size),
            stride=(1, *conv.stride),
            padding=(0, *conv.padding),
            dilation=(1, *conv.dilation),
            dtype=F64,
        )
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.unsqueeze(2))
            self.conv.bias.copy_(conv.bias)

    def forward(self, x):
        return self.conv(x.unsqueeze(2)).squeeze(2)


class GroupsAsConvs(nn.Module):
    """A grouped Conv2d computed by one Conv2d per group on its channels."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        g, c, r = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
        self.c = c
        self.convs = nn.ModuleList(
            nn.Conv2d(c, r, conv.kernel_size, conv.stride, conv.padding, conv.dilation, dtype=F64)
            for _ in range(g)
        )
        with torch.no_grad():
            for j, part in enumerate(self.convs):
                part.weight.copy_(conv.weight[j * r : (j + 1) * r])
                part.bias.copy_(conv.bias[j * r : (j + 1) * r])

    def forward(self, x):
        return torch.cat(
            [part(x[:, j * self.c : (j + 1) * self.c]) for j, part in enumerate(self.convs)], 1
        )


def _conv1d_case(seed: int):
    torch.manual_seed(seed)
    conv = nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, dtype=F64)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4, 3, dtype=F64))
    twin = nn.Sequential(Conv1dAs2d(conv), *copy.deepcopy(list(model)[1:]))
    X = torch.randn(7, 2, 7, dtype=F64, generator=torch.Generator().manual_seed(seed))
    # our tensor i <-> their tensors; our slices of a row-sliced block <-> their tensors
    return model, twin, X, {0: [0], 1: [1], 2: [2], 3: [3]}


def _grouped_case(seed: int):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, groups=2, stride=(2, 1), padding=1, dtype=F64)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(6 * 2 * 4, 3, dtype=F64))
    twin = nn.Sequential(GroupsAsConvs(conv), *copy.deepcopy(list(model)[1:]))
    X = torch.randn(7, 4, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return model, twin, X, {0: [0, 2], 1: [1, 3], 2: [4], 3: [5]}


def _attention_case(seed: int):
    model, X, _ = L.self_attention(seed=seed, n=7)
    with torch.no_grad():
        model.attn.in_proj_bias.normal_(0.0, 0.5)
    twin = L.ExplicitSelfAttentionNet(model)
    # in_proj_weight/bias -> q, k, v weights/biases; out_proj -> o; the head
    return model, twin, X, {0: [0, 2, 4], 1: [1, 3, 5], 2: [6], 3: [7], 4: [8], 5: [9]}


CASES = {"conv1d": _conv1d_case, "grouped": _grouped_case, "attention": _attention_case}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_laplace_torch_on_the_equivalent_model(case):
    model, twin, X, mapping = CASES[case](seed=4)
    y = torch.randint(0, 3, (len(X),), generator=torch.Generator().manual_seed(5))
    assert rel_err(twin(X), model(X)) < 1e-14
    data = DataLoader(TensorDataset(X, y), batch_size=3)
    la = KronLaplace(twin, "classification", backend=CurvlinopsGGN, temperature=T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(data)
    post = sk.fit_laplace(model, data, prior="layerwise", temperature=T, progress=False)
    theirs = la.H_facs.kfacs
    for index, factors in enumerate(post.kron_factors):
        parts = mapping[index]
        for k, ours in enumerate(factors):
            stacked = (
                torch.stack([theirs[j][k] for j in parts])
                if len(parts) > 1
                else theirs[parts[0]][k]
            )
            assert ours.shape == stacked.shape and rel_err(ours, stacked) < TOL
    # random per-tensor precisions; each of their tensors gets its source tensor's value
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        post.prior.log_precision.add_(
            torch.randn(post.prior.log_precision.shape, generator=gen, dtype=F64)
        )
    ours_delta = post.prior.log_precision.detach().exp()
    their_delta = torch.empty(len(theirs), dtype=F64)
    for index, parts in mapping.items():
        their_delta[parts] = ours_delta[index]
    la.prior_precision = their_delta
    lml = float(post.log_marginal_likelihood().detach())
    assert lml == pytest.approx(float(la.log_marginal_likelihood()), rel=TOL)
    assert float(post.log_det_posterior_precision().detach()) == pytest.approx(
        float(la.log_det_posterior_precision), rel=TOL
    )
    # their tensors reassembled in our order: a row-sliced tensor's slices are consecutive rows
    sizes = [p.numel() for p in twin.parameters()]
    chunks = la.posterior_precision.diag().split(sizes)
    reordered = torch.cat([chunks[j] for index in sorted(mapping) for j in mapping[index]])
    assert rel_err(post.precision_diag(), reordered) < TOL
