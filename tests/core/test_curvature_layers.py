"""Kronecker factors of Conv1d, grouped/depthwise convolutions and multi-head attention.

* factors equal a naive per-sample, per-position, per-group reference (attention: the same
  computation written with four nn.Linear layers), GGN and EF;
* for one sample at one position each row slice's G_j ⊗ A_j is the exact GGN block of the
  slice's rows; structure="diag" is the dense GGN diagonal;
* log det, precision and covariance diagonals and J Σ Jᵀ of the block-diagonal-of-Kroneckers
  agree with dense float64 matrices for every prior (parameterwise: the upper bound).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spamkern as sk

from . import layers as L
from .dense import dense_curvature, expected_log_prior, rel_err
from .fitting import fit_perturbed

TOL = 1e-10
EVIDENCE_TOL = 1e-8
PRIORS = ["scalar", "layerwise", "unitwise", "parameterwise"]
CASES = {
    "conv1d": (L.conv1d, None),
    "grouped": (L.grouped, None),
    "self-attention": (L.self_attention, L.ExplicitSelfAttentionNet),
    "cross-attention": (L.cross_attention, L.ExplicitCrossAttentionNet),
}
# attention parameters -> the reference's Linear layers (one per row slice)
_ATTENTION = {
    "in_proj_weight": ("q", "k", "v"),
    "in_proj_bias": ("q", "k", "v"),
    "q_proj_weight": ("q",),
    "k_proj_weight": ("k",),
    "v_proj_weight": ("v",),
    "out_proj.weight": ("o",),
    "out_proj.bias": ("o",),
}


def _reference(block, ref: dict) -> list[torch.Tensor]:
    """The naive factors of one block, stacked over its row slices when it has several."""
    prefix, _, local = block.name.partition(".")
    if local in _ATTENTION:
        slices = [ref[f"{prefix}.{site}"] for site in _ATTENTION[local]]
        G, A = [s[0][0] for s in slices], [s[1][0] for s in slices]
    else:
        G, A = ref[block.name.rpartition(".")[0]]
    factors = [G] if block.name.endswith("bias") else [G, A]
    return [torch.stack(f) if len(f) > 1 else f[0] for f in factors]


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("case", list(CASES))
def test_factors_equal_naive_reference(case, curvature):
    factory, explicit = CASES[case]
    model, X, y = factory(seed=3)
    ref_model = model if explicit is None else explicit(model)
    assert rel_err(ref_model(X), model(X)) < 1e-14
    ref = L.naive_factors(ref_model, X, y, curvature)
    H, _ = dense_curvature(model, X, y, curvature=curvature)
    post = sk.fit_laplace(model, (X, y), curvature=curvature, batch_size=4, progress=False)
    assert [b.name for b in post.blocks] == [n for n, _ in model.named_parameters()]
    for block, factors in zip(post.blocks, post.kron_factors, strict=True):
        if isinstance(factors, torch.Tensor):  # attention's bias_k/bias_v: exact diagonal
            sl = slice(block.offset, block.offset + block.numel)
            assert block.name.endswith(("bias_k", "bias_v"))
            assert rel_err(factors.reshape(-1), H.diagonal()[sl]) < TOL
            continue
        theirs = _reference(block, ref)
        assert len(factors) == len(theirs)
        for ours, their in zip(factors, theirs):
            assert ours.shape == their.shape and rel_err(ours, their) < TOL
    diag = sk.fit_laplace(
        model, (X, y), structure="diag", curvature=curvature, batch_size=4, progress=False
    )
    assert rel_err(diag.curvature_diag(), H.diagonal()) < TOL


def _one_position_models():
    """Each layer sees one position per sample: a (3, 2) grouped kernel over a (3, 2) input,
    a depthwise Conv1d whose kernel spans its input, length-1 attention."""
    torch.manual_seed(8)
    grouped = nn.Sequential(
        nn.Conv2d(4, 6, (3, 2), groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)
    ).double()
    depthwise = nn.Sequential(
        nn.Conv1d(3, 6, 4, groups=3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)
    ).double()
    attention = L.SelfAttentionNet(length=1).double()
    with torch.no_grad():
        attention.attn.in_proj_bias.normal_(0.0, 0.5)
    return {
        "grouped": (grouped, torch.randn(1, 4, 3, 2, dtype=torch.float64)),
        "depthwise": (depthwise, torch.randn(1, 3, 4, dtype=torch.float64)),
        "attention": (attention, torch.randn(1, 1, 4, dtype=torch.float64)),
    }


@pytest.mark.parametrize("name", ["grouped", "depthwise", "attention"])
def test_each_row_slice_is_the_exact_ggn_block_for_one_sample(name):
    model, X = _one_position_models()[name]
    y = torch.tensor([1])
    H, _ = dense_curvature(model, X, y)
    post = sk.fit_laplace(model, (X, y), progress=False)
    sliced = 0
    for block, factors in zip(post.blocks, post.kron_factors):
        slices = factors[0].shape[0] if factors[0].ndim == 3 else 1
        stacked = [f if f.ndim == 3 else f.unsqueeze(0) for f in factors]
        size = block.numel // slices
        for j in range(slices):
            start = block.offset + j * size
            exact = H[start : start + size, start : start + size]
            ours = torch.kron(stacked[0][j], stacked[1][j]) if len(factors) == 2 else stacked[0][j]
            assert rel_err(ours, exact) < TOL
        sliced += slices > 1
    assert sliced >= 1


def _dense_curvature_matrix(post) -> torch.Tensor:
    """Block-diagonal K: per tensor, per row slice kron(G_j, A_j) (or G_j), or diag(h)."""
    mats = []
    for factors in post.kron_factors:
        if isinstance(factors, torch.Tensor):
            mats.append(torch.diag(factors.reshape(-1)))
            continue
        stacked = [f if f.ndim == 3 else f.unsqueeze(0) for f in factors]
        for j in range(stacked[0].shape[0]):
            mats.append(
                torch.kron(stacked[0][j], stacked[1][j]) if len(factors) == 2 else stacked[0][j]
            )
    return torch.block_diag(*mats)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("case", list(CASES))
def test_evidence_and_diagonals_against_dense(case, prior):
    post, model, X, y = fit_perturbed(
        (CASES[case][0], "classification"), prior, "kron", 2, batch_size=3, perturb_offset=50
    )
    s = post.curvature_scale
    precision = s * _dense_curvature_matrix(post) + torch.diag(expected_log_prior(post.prior).exp())
    exact = torch.linalg.slogdet(precision)[1]
    ours = post.log_det_posterior_precision().detach()
    covariance = torch.linalg.inv(precision)
    J = torch.randn(
        2, 3, post.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    if prior == "parameterwise":  # Hadamard's bound in each slice's eigenbasis
        assert float(ours) >= float(exact) - EVIDENCE_TOL * abs(float(exact))
    else:
        assert float(ours) == pytest.approx(float(exact), rel=EVIDENCE_TOL)
        assert rel_err(post.covariance_diag(), covariance.diagonal()) < EVIDENCE_TOL
        assert rel_err(post.functional_variance(J), J @ covariance @ J.transpose(1, 2)) < 1e-8
    assert rel_err(post.precision_diag(), precision.diagonal()) < EVIDENCE_TOL
    assert rel_err(post.curvature_diag(), _dense_curvature_matrix(post).diagonal()) < TOL
    # the evidence is differentiable in the hyperparameters
    post.log_marginal_likelihood().backward()
    assert torch.isfinite(post.prior.log_precision.grad).all()


def test_unitwise_hyperparameters_of_grouped_and_attention_weights():
    """Unitwise: a per output row, b per input column of the weight — in/g entries for a
    grouped convolution (shared by its groups and kernel positions), E for in_proj_weight."""
    model, _, _ = L.grouped()
    prior = sk.make_prior("unitwise", list(model.named_parameters()))
    widths = {slot.name: slot.stop - slot.start for slot in prior.slots}
    assert widths["0.weight"] == 6 + 2 and widths["2.weight"] == 6 + 1
    model, _, _ = L.self_attention()
    prior = sk.make_prior("unitwise", list(model.named_parameters()))
    widths = {slot.name: slot.stop - slot.start for slot in prior.slots}
    assert widths["attn.in_proj_weight"] == 12 + 4 and widths["attn.in_proj_bias"] == 12


def test_laplace_torch_backend_refuses_row_sliced_blocks():
    """laplace-torch's Kron holds one (G, A) per tensor: a grouped convolution is refused by
    name (its DiagLaplace path works)."""
    from spamkern.integrations.laplace import SpamkernGGN

    model, X, y = L.grouped(seed=1)
    backend = SpamkernGGN(model, "classification")
    with pytest.raises(ValueError, match="'0.weight'.*row slice"):
        backend.kron(X, y, N=len(y))
    H, _ = dense_curvature(model, X, y)
    _, diag = backend.diag(X, y, N=len(y))
    assert rel_err(diag, H.diagonal()) < TOL


class _ScaledAttention(nn.MultiheadAttention):
    """A subclass whose forward is not PyTorch's attention: it must not be factored as one."""

    def forward(self, query, key, value, **kwargs):
        out, weights = super().forward(query, key, value, **kwargs)
        return 2.0 * out, weights


class _AttentionOn(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention, batched: bool = True):
        super().__init__()
        self.attn, self.head, self.batched = attention, nn.Linear(4, 3), batched

    def forward(self, x):
        if self.batched:
            return self.head(self.attn(x, x, x)[0].mean(1))
        return torch.stack([self.head(self.attn(s, s, s)[0].mean(0)) for s in x])


@pytest.mark.parametrize(
    ("attention", "batched", "match"),
    [
        (_ScaledAttention(4, 2, batch_first=True), True, "could not reproduce"),
        (nn.MultiheadAttention(4, 2, batch_first=True), False, "unbatched"),
    ],
)
def test_attention_it_cannot_factor_is_refused(attention, batched, match):
    model = _AttentionOn(attention, batched).double()
    X, y = torch.randn(3, 2, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=match):
        sk.fit_laplace(model, (X, y), progress=False)
    H, _ = dense_curvature(model, X, y)  # structure="diag" needs no factorisation
    diag = sk.fit_laplace(model, (X, y), structure="diag", progress=False)
    assert rel_err(diag.curvature_diag(), H.diagonal()) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["grouped", "self-attention"])
def test_cuda_matches_cpu(case):
    """float64 on the GPU: the same row-sliced factors and unitwise/parameterwise evidence."""
    model, X, y = CASES[case][0](seed=9)
    results = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        for prior in ("unitwise", "parameterwise"):
            post = sk.fit_laplace(m, (X.to(device), y.to(device)), prior=prior, progress=False)
            arrays = [
                t.cpu() for f in post.kron_factors for t in (f if isinstance(f, tuple) else [f])
            ]
            results[device, prior] = (arrays, float(post.log_marginal_likelihood().detach()))
    for prior in ("unitwise", "parameterwise"):
        (cpu_arrays, cpu_lml), (gpu_arrays, gpu_lml) = results["cpu", prior], results["cuda", prior]
        for a, b in zip(gpu_arrays, cpu_arrays, strict=True):
            assert rel_err(a, b) < 1e-8
        assert gpu_lml == pytest.approx(cpu_lml, rel=1e-8)


def test_attention_dropout_in_training_mode_is_replayed():
    """Recording a training-mode forward (curvature harvested from the training sweep)
    recomputes attention with the same dropout mask and leaves the same random state."""
    from spamkern.curvature.accumulate import _Recorder
    from spamkern.curvature.structure import parameter_blocks

    torch.manual_seed(10)
    model = _AttentionOn(nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)).double()
    model.train()
    X = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.manual_seed(11)
    plain = model(X)
    after_plain = torch.rand(1)
    recorder = _Recorder(parameter_blocks(model, "kron"))
    try:
        torch.manual_seed(11)
        recorded = model(X)
        after_recorded = torch.rand(1)
    finally:
        recorder.remove()
    assert torch.equal(recorded, plain) and torch.equal(after_recorded, after_plain)
    assert len(recorder.records[id(model.attn)].calls) == 1


@pytest.mark.parametrize(
    ("inputs", "kdim"),
    [("q=k=v", None), ("k=v", None), ("q,k,v", None), ("q,k,v", 3)],
    ids=["self-attention", "shared-key-value", "separate-inputs", "separate-weights"],
)
def test_recorded_attention_is_the_modules_own_output_bit_for_bit(inputs, kdim):
    """The recomputation replaces the module's output, so its projections must be the
    module's own products (one packed product for self-attention, one for a shared key and
    value): split products add in another order on some BLAS builds."""
    from spamkern.curvature.accumulate import _Recorder
    from spamkern.curvature.structure import parameter_blocks

    torch.manual_seed(12)
    attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim).double()
    q = torch.randn(5, 7, 8, dtype=torch.float64)
    k = q if inputs == "q=k=v" else torch.randn(5, 6, kdim or 8, dtype=torch.float64)
    v = k if inputs != "q,k,v" else torch.randn(5, 6, kdim or 8, dtype=torch.float64)
    plain = attn(q, k, v)[0]
    recorder = _Recorder(parameter_blocks(attn, "kron"))
    try:
        recorded = attn(q, k, v)[0]
    finally:
        recorder.remove()
    assert torch.equal(recorded, plain)
    sites = recorder.records[id(attn)].calls[0]
    assert sorted(sites) == ["k", "out", "q", "v"]


@pytest.mark.parametrize("case", ["grouped", "self-attention"])
def test_kron_cost_of_row_sliced_blocks_against_dense(case):
    """The pruning cost c(M) = ½ vec(Δ)ᵀ Π vec(Δ) (Δ = −θ on removed entries) sees each row
    slice's own Kronecker block."""
    post, model, _, _ = fit_perturbed(
        (CASES[case][0], "classification"), "layerwise", "kron", 4, batch_size=3, perturb_offset=7
    )
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) > 0.4 for n, p in model.named_parameters()}
    keep = torch.cat([masks[n].reshape(-1) for n, _ in model.named_parameters()])
    delta = torch.where(keep, torch.zeros_like(post.mean), -post.mean)
    precision = post.curvature_scale * _dense_curvature_matrix(post) + torch.diag(
        expected_log_prior(post.prior).exp()
    )
    assert float(sk.kron_cost(post, masks)) == pytest.approx(
        float(0.5 * delta @ precision @ delta), rel=1e-10
    )
