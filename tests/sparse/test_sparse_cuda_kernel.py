"""The CUDA block-sparse kernel: compiles with nvcc alone here, matches F.linear on a GPU.

The .cu kernel sources must build without torch (CI has nvcc but only a CPU torch); the
torch glue is syntax-checked against torch's headers with a stub for the one header a CPU
build of torch lacks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from sparse_helpers import TOL, make_case, rel_err

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_kernel_sources_do_not_include_torch():
    assert KERNEL_SOURCES, "no CUDA kernel sources found"
    for path in [*KERNEL_SOURCES, *CUDA_DIR.glob("*.cuh"), *CUDA_DIR.glob("*.h")]:
        includes = re.findall(r'#include\s*[<"]([^>"]+)', path.read_text())
        bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")]
        assert not bad, f"{path.name} includes torch headers {bad}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernel_source_compiles_for_sm80_and_sm90(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O2", "-I", str(ROOT / "csrc")]
    for arch in ("80", "90"):
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-c", str(source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_torch_glue_parses(tmp_path):
    from torch.utils import cpp_extension

    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime.h").exists():
        cuda_include = Path("/usr/local/cuda/include")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", f"-I{tmp_path / 'stub'}", f"-I{cuda_include}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    for glue in sorted(CUDA_DIR.glob("*.cpp")):
        result = subprocess.run(
            [*cmd, f"-I{ROOT / 'csrc'}", str(glue)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "block,m,density",
    [((32, 16), 1, 0.4), ((64, 64), 37, 0.3), ((128, 32), 130, 0.5), ((64, 128), 64, 1.0)],
)
def test_cuda_kernel_matches_masked_dense(dtype, block, m, density):
    from spamkern.sparse import bsr_linear

    x, w, b, ref = make_case(264, 520, m, block, density, dtype, m + block[0], device="cuda")
    y = bsr_linear(x, w, b, backend="cuda")
    assert y.dtype == dtype and rel_err(y.cpu(), ref.cpu()) < TOL[dtype]
    y0 = bsr_linear(x, w, None, backend="cuda")
    assert rel_err(y0.cpu(), (ref - b.double()).cpu()) < TOL[dtype]
