"""Curvature benchmarks (the sizes of bench/README.md), pytest-benchmark, every case in one run.

    python -m pytest bench/bench_curvature.py                # full sizes (meant for a GPU)
    python -m pytest bench/bench_curvature.py --quick        # small sizes, a CPU check
    python bench/run_curvature_gpu.py                         # GPU run + results file

Per model (MLP 784-1024-1024-10 on N=20480, CNN 3 convs + linear on N=10240 3×32×32):
the sweep (forward + backward, staged batches and through a DataLoader), spamkern's KFAC fit
per curvature type (staged batches, and exact GGN from in-memory tensors), the plain-torch
batched exact-GGN KFAC, laplace-torch's KronLaplace fit per backend, and for the posterior
the precision diagonal + OPD + global threshold pass and 100 hypersteps per prior, and the
per-batch factor products alone (Triton against unfold + matmul). Each case
carries ``extra_info`` (model, case) so the runner can form ratios inside one run.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from curvature_baselines import cnn, mlp, plain_exact_ggn_kfac, sweep
from torch.utils.data import DataLoader, TensorDataset

import spamkern as sk
from spamkern.ops.precision import kron_precision_and_opd
from spamkern.ops.select import threshold_for_sparsity

MODELS = ("mlp", "cnn")
HAS_LAPLACE = importlib.util.find_spec("laplace") is not None


class Workload:
    """A model with its data: staged device batches, device tensors and a DataLoader."""

    def __init__(self, name: str, sizes, device: torch.device):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        if name == "mlp":
            self.model = mlp(sizes.mlp_width)
            n, self.batch = sizes.mlp_n, sizes.mlp_batch
            X = torch.randn(n, 784, generator=gen)
        else:
            self.model = cnn(sizes.cnn_channels)
            n, self.batch = sizes.cnn_n, sizes.cnn_batch
            X = torch.randn(n, 3, sizes.cnn_hw, sizes.cnn_hw, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        self.name, self.n = name, n
        self.model = self.model.to(device)
        self.X, self.y = X.to(device), y.to(device)
        self.staged = [
            (self.X[i : i + self.batch], self.y[i : i + self.batch])
            for i in range(0, n, self.batch)
        ]
        pin = device.type == "cuda"
        self.loader = DataLoader(TensorDataset(X, y), batch_size=self.batch, pin_memory=pin)
        self.device = device

    def loader_batches(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


_WORKLOADS: dict[str, Workload] = {}


@pytest.fixture(params=MODELS)
def work(request, sizes, device) -> Workload:
    if request.param not in _WORKLOADS:
        _WORKLOADS[request.param] = Workload(request.param, sizes, device)
    return _WORKLOADS[request.param]


def _tag(benchmark, work: Workload, case: str) -> None:
    benchmark.group = f"curvature {work.name}"
    benchmark.extra_info.update(model=work.name, case=case, n=work.n, batch=work.batch)


# ------------------------------------------------------------------ sweeps and fits
def test_sweep_staged(benchmark, timed, work, sizes, device):
    _tag(benchmark, work, "sweep_staged")
    timed(lambda: sweep(work.model, work.staged), sizes.rounds)


def test_sweep_loader(benchmark, timed, work, sizes, device):
    _tag(benchmark, work, "sweep_loader")
    timed(lambda: sweep(work.model, work.loader_batches()), sizes.rounds)


@pytest.mark.parametrize("curvature", ["ggn", "ggn-mc", "ef"])
def test_spamkern_fit(benchmark, timed, work, sizes, device, curvature):
    _tag(benchmark, work, f"spamkern_{curvature}")

    def fit():
        return sk.fit_laplace(
            work.model, work.staged, structure="kron", curvature=curvature, prior="layerwise"
        )

    timed(fit, sizes.rounds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="on the CPU auto already is torch")
def test_spamkern_fit_reference_ops(benchmark, timed, work, sizes, device, monkeypatch):
    """Exact GGN with SPAMKERN_BACKEND=torch: what the Triton kernels add to the same pass."""
    _tag(benchmark, work, "spamkern_ggn_torch_ops")
    monkeypatch.setenv("SPAMKERN_BACKEND", "torch")

    def fit():
        return sk.fit_laplace(
            work.model, work.staged, structure="kron", curvature="ggn", prior="layerwise"
        )

    timed(fit, sizes.rounds)


def test_spamkern_fit_from_tensors(benchmark, timed, work, sizes, device):
    """In-memory (X, y) is batched on the device: no DataLoader collation to pay."""
    _tag(benchmark, work, "spamkern_ggn_tensors")

    def fit():
        return sk.fit_laplace(
            work.model, (work.X, work.y), structure="kron", curvature="ggn",
            prior="layerwise", batch_size=work.batch,
        )  # fmt: skip

    timed(fit, sizes.rounds)


def test_plain_torch_exact_ggn(benchmark, timed, work, sizes, device):
    _tag(benchmark, work, "plain_torch_ggn")
    timed(lambda: plain_exact_ggn_kfac(work.model, work.staged), sizes.rounds)


@pytest.mark.skipif(not HAS_LAPLACE, reason="laplace-torch is not installed")
@pytest.mark.parametrize("backend", ["AsdlGGN", "AsdlEF", "CurvlinopsGGN"])
def test_laplace_torch_fit(benchmark, timed, work, sizes, device, backend):
    """laplace-torch's KronLaplace on a fresh copy of the model each round (its backends
    leave state on the model), through the DataLoader it requires."""
    import laplace.curvature
    from laplace import KronLaplace

    _tag(benchmark, work, f"laplace_{backend}")
    backend_cls = getattr(laplace.curvature, backend)

    def setup():
        return (copy.deepcopy(work.model),), {}

    def fit(model):
        KronLaplace(model, "classification", backend=backend_cls).fit(work.loader)

    timed(fit, sizes.rounds, setup=setup)


# ------------------------------------------------------------------ posterior passes
_POSTERIORS: dict[tuple[str, str, str], object] = {}


def _posterior(work: Workload, curvature: str, prior: str):
    key = (work.name, curvature, prior)
    if key not in _POSTERIORS:
        _POSTERIORS[key] = sk.fit_laplace(
            work.model, work.staged, structure="kron", curvature=curvature, prior=prior
        )
    return _POSTERIORS[key]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_precision_opd_threshold(benchmark, timed, sizes, device, monkeypatch, backend):
    """diag Π + OPD scores + global 90 % threshold from the MLP's factor diagonals."""
    if "mlp" not in _WORKLOADS:
        _WORKLOADS["mlp"] = Workload("mlp", sizes, device)
    work = _WORKLOADS["mlp"]
    monkeypatch.setenv("SPAMKERN_BACKEND", backend)
    _tag(benchmark, work, f"precision_opd_threshold_{backend}")
    post = _posterior(work, "ef", "layerwise")
    diag_g, diag_a = [], []
    for block in post.kron_factors:
        diag_g.append(block[0].diagonal())
        diag_a.append(block[1].diagonal() if len(block) == 2 else None)
    theta = post.mean
    prior = post.prior.precision_diag().detach()
    scale = post.curvature_scale
    benchmark.extra_info["n_params"] = theta.numel()

    def one_pass():
        _, scores = kron_precision_and_opd(theta, diag_g, diag_a, prior, scale)
        return threshold_for_sparsity(scores, 0.9)

    timed(one_pass, max(sizes.rounds, 20), warmup=3)


@pytest.mark.parametrize("prior", ["layerwise", "parameterwise", "unitwise"])
def test_hypersteps(benchmark, timed, work, sizes, device, prior):
    """100 Adam steps on −log p(D | δ)/N with the eigendecomposition already cached."""
    _tag(benchmark, work, f"hypersteps100_{prior}")
    post = _posterior(work, "ef", prior)
    log_prec = post.prior.log_precision
    optimiser = torch.optim.Adam([log_prec], lr=0.1)

    def steps(n: int = 100):
        for _ in range(n):
            optimiser.zero_grad()
            loss = -post.log_marginal_likelihood() / work.n
            loss.backward()
            optimiser.step()

    steps(1)  # eigendecomposition and packing, once per marglik step
    timed(steps, sizes.rounds)


def test_eigendecomposition_and_first_step(benchmark, timed, work, sizes, device):
    """What a marglik step pays once before its hypersteps: eigh of every factor + packing."""
    _tag(benchmark, work, "eigen_first_step")
    curvature = _posterior(work, "ef", "layerwise").curvature

    def setup():
        post = sk.posterior.LaplacePosterior(
            work.model, curvature, _posterior(work, "ef", "layerwise").prior,
            "classification", "kron", "ef", 1.0, 1.0,
        )  # fmt: skip
        return (post,), {}

    def first(post):
        (-post.log_marginal_likelihood() / work.n).backward()

    timed(first, sizes.rounds, setup=setup)


# ------------------------------------------------------------------ factor products alone
# (name, kind, shape): the per-batch products of benchmark models' KFAC pass
FACTOR_SHAPES = [
    ("mlp_G_1024", "gram", (10 * 256, 1024)),  # exact GGN: C·B pseudo-gradient rows
    ("mlp_A_784", "gram", (256, 784)),
    ("cnn_A_conv2", "conv", (128, 64, 16, 16)),  # 3×3, padding 1: (c·9)² = 576²
    ("cnn_A_conv3", "conv", (128, 128, 8, 8)),  # 1152²
    ("cnn_G_conv2", "gram", (10 * 128 * 16 * 16, 128)),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    ("name", "kind", "shape"), FACTOR_SHAPES, ids=[s[0] for s in FACTOR_SHAPES]
)
def test_factor_product(benchmark, timed, sizes, device, monkeypatch, backend, name, kind, shape):
    """One batch's factor product: Triton (upper tiles, implicit im2col) vs the torch route
    (one triangle by panels; for a convolution, row correlations)."""
    from spamkern.ops import conv_patch_gram, gram

    if backend == "triton" and device.type != "cuda":
        pytest.skip("Triton timings need a GPU (the interpreter is for tests)")
    monkeypatch.setenv("SPAMKERN_BACKEND", backend)
    benchmark.group = "factor products"
    benchmark.extra_info.update(model="factors", case=f"{name}_{backend}", shape=list(shape))
    if sizes.quick:  # an eighth of the rows, to check that the case runs
        shape = (max(1, shape[0] // 8), *shape[1:])
    x = torch.randn(*shape, device=device)
    d = shape[1] * 9 if kind == "conv" else shape[1]
    out = torch.zeros(d, d, device=device)
    if kind == "conv":
        timed(lambda: conv_patch_gram(x, (3, 3), (1, 1), (1, 1), (1, 1), out, 1.0), 20, warmup=3)
    else:
        timed(lambda: gram(x, out, 1.0), 20, warmup=3)
