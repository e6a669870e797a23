"""Sparse inference benchmarks (pytest-benchmark): block-sparse and 2:4 against dense.

    python -m pytest bench/bench_sparse.py --benchmark-group-by=group   # CPU part here
    python -m pytest bench/bench_sparse.py -k cuda                      # on a GPU machine

CPU: spamkern's C++ kernel against torch's dense F.linear on a 2048×2048 layer, batch 256,
64×64 blocks, at 1 and 2 threads (fixed per case: `torch.set_num_threads`). GPU (the
§2 shapes, fp16): dense cuBLAS, torch BSR, torch 2:4, spamkern Triton, spamkern CUDA, and
an end-to-end MLP block 4096→11008→4096 at 50/75/90 % block sparsity. Every case in one
group runs in the same process, so ratios within a group compare like with like.
``bench/run_sparse_gpu.py`` runs the GPU part with do_bench and writes the results file.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spamkern.sparse import BlockSparseWeight, bsr_linear

CUDA = torch.cuda.is_available()


def _ext_available() -> bool:
    try:
        from spamkern import _ext
    except ImportError:
        return False
    return _ext.AVAILABLE


def _case(m, k, n, sparsity, block, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nb, kb = n // block[0], k // block[1]
    mask = torch.rand(nb, kb, generator=gen) >= sparsity
    w = torch.randn(n, k, generator=gen).to(dtype)
    sparse = BlockSparseWeight.from_dense(w, block, mask).to(device)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    return x, sparse, sparse.to_dense()


# --------------------------------------------------------------------------- CPU
CPU_SPARSITIES = [0.5, 0.75, 0.9]


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("sparsity", CPU_SPARSITIES)
def test_cpu_dense_linear(benchmark, threads, sparsity):
    x, _, dense = _case(256, 2048, 2048, sparsity, (64, 64), torch.float32, "cpu")
    benchmark.group = f"cpu 256x2048x2048 {int(sparsity * 100)}% threads={threads}"
    benchmark(F.linear, x, dense)


@pytest.mark.skipif(not _ext_available(), reason="spamkern._C is not built")
@pytest.mark.parametrize("sparsity", CPU_SPARSITIES)
def test_cpu_spamkern_cpp(benchmark, threads, sparsity):
    x, sparse, dense = _case(256, 2048, 2048, sparsity, (64, 64), torch.float32, "cpu")
    benchmark.group = f"cpu 256x2048x2048 {int(sparsity * 100)}% threads={threads}"
    y = benchmark(bsr_linear, x, sparse, None, "cpp")
    torch.testing.assert_close(y, F.linear(x, dense), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- GPU
GPU_CASES = [  # (m, k, n, sparsity) the GPU targets' shapes, 64×64 blocks
    (4096, 4096, 4096, 0.5),
    (4096, 4096, 4096, 0.9),
    (4096, 4096, 4096, 0.95),
    (4096, 4096, 11008, 0.9),
    (64, 4096, 4096, 0.9),
]
GPU_IDS = [f"{m}x{k}x{n}-{int(s * 100)}" for m, k, n, s in GPU_CASES]


def _cuda_timed(benchmark, fn, *args):
    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return benchmark.pedantic(run, warmup_rounds=5, rounds=50, iterations=1)


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
@pytest.mark.parametrize(
    "impl", ["cuda_dense", "cuda_torch_bsr", "cuda_spamkern_triton", "cuda_spamkern_cuda"]
)
def test_cuda_block_sparse(benchmark, case, impl):
    m, k, n, sparsity = case
    x, sparse, dense = _case(m, k, n, sparsity, (64, 64), torch.float16, "cuda")
    benchmark.group = f"cuda fp16 {m}x{k}x{n} {int(sparsity * 100)}%"
    if impl == "cuda_dense":
        _cuda_timed(benchmark, F.linear, x, dense)
    elif impl == "cuda_torch_bsr":
        bsr = dense.to_sparse_bsr((64, 64))
        _cuda_timed(benchmark, F.linear, x, bsr)
    elif impl == "cuda_spamkern_triton":
        _cuda_timed(benchmark, bsr_linear, x, sparse, None, "triton")
    else:
        if not _ext_available() or "cuda" not in _backends():
            pytest.skip("spamkern._C was built without CUDA")
        _cuda_timed(benchmark, bsr_linear, x, sparse, None, "cuda")


def _backends():
    from spamkern.dispatch import available_backends

    return available_backends("bsr_linear")


@gpu
@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (4096, 4096, 11008), (8192, 8192, 8192)])
@pytest.mark.parametrize("impl", ["cuda_dense", "cuda_torch_24", "cuda_spamkern_24"])
def test_cuda_2to4(benchmark, shape, impl):
    from spamkern.sparse import SemiStructuredLinear

    m, k, n = shape
    lin = torch.nn.Linear(k, n, bias=False).half().cuda()
    keep = torch.rand(n, k // 4, 4, device="cuda").topk(2, dim=-1).indices
    mask = torch.zeros(n, k // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True)
    mask = mask.reshape(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    benchmark.group = f"cuda fp16 2:4 {m}x{k}x{n}"
    w = lin.weight.detach() * mask
    if impl == "cuda_dense":
        _cuda_timed(benchmark, F.linear, x, w)
    elif impl == "cuda_torch_24":
        from torch.sparse import to_sparse_semi_structured

        _cuda_timed(benchmark, F.linear, x, to_sparse_semi_structured(w))
    else:
        layer = SemiStructuredLinear.from_dense(lin, mask)
        with torch.no_grad():
            layer(x)
            benchmark.extra_info["choice"] = layer.last_choice.reason
            _cuda_timed(benchmark, layer, x)


@gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9])
def test_cuda_mlp_block(benchmark, sparsity):
    """Transformer MLP block 4096→11008→4096 (GELU), 4096 tokens, fp16, 64×64 blocks."""
    from spamkern.sparse import convert_to_block_sparse

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(4096, 11008), torch.nn.GELU(), torch.nn.Linear(11008, 4096)
    )
    mlp = mlp.half().cuda().eval()
    if sparsity > 0:
        masks = {
            f"{i}.weight": torch.rand(mlp[i].out_features // 64, mlp[i].in_features // 64)
            >= sparsity
            for i in (0, 2)
        }
        mlp = convert_to_block_sparse(mlp, masks, block=(64, 64))
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    benchmark.group = "cuda fp16 MLP 4096-11008-4096, 4096 tokens"
    with torch.no_grad():
        mlp(x)
        _cuda_timed(benchmark, mlp, x)
