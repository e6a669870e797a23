"""The Triton kernels compile for Ampere (sm_80) and Hopper (sm_90) without a GPU.

Ahead-of-time compilation with the divisibility hints the JIT gives 16-aligned arguments,
in a subprocess (the test session runs Triton in its interpreter). Checks that the
tensor-core path (mma.sync on sm_80, wgmma on sm_90) and asynchronous copies are used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
import triton  # noqa: E402,F401  (a dependency: its absence is a failure)

_COMPILE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from spamkern.dispatch import kernel_module
    kb = kernel_module("block_sparse")

    def compile_one(fn, dtype, const, cap, warps, stages):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in ("row_ptr", "col_idx", "row_order"):
                sig[name] = "*i32"
            elif name == "y32_ptr":
                sig[name] = "*fp32"
            elif name.endswith("_ptr"):
                sig[name] = "*" + dtype
            elif name in ("M", "N", "K", "stride_xm", "stride_ym"):
                sig[name] = "i32"
            else:
                sig[name] = "constexpr"
                continue
            if name != "M":
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, const, attrs)
        opts = {"num_warps": warps, "num_stages": stages}
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
        ptx = k.asm["ptx"]
        return {"mma": "mma.sync" in ptx, "wgmma": "wgmma" in ptx, "async": "cp.async" in ptx}

    base = {"HAS_BIAS": True, "EVEN_K": False, "UPCAST": False, "F32_PRECISION": "ieee"}
    out = []
    for cap in (80, 90):
        cases = (("fp16", 64, 64, 128), ("bf16", 128, 32, 64), ("fp32", 32, 16, 64))
        for dtype, bn, bk, bm in cases:
            c = dict(base, BN=bn, BK=bk, BLOCK_M=bm, COL_SPLIT=2 if dtype == "bf16" else 1)
            found = compile_one(kb._bsr_linear_kernel, dtype, c, cap, 4, 3)
            out.append([cap, dtype, "tiled", found])
        c = dict(base, BN=64, BK=64, BLOCK_M=256)
        found = compile_one(kb._bsr_linear_t_kernel, "fp16", c, cap, 8, 3)
        out.append([cap, "fp16", "tiled", found])
        c = dict(base, BN=64, BK=64, BLOCK_M=16, SPLIT=4)
        found = compile_one(kb._bsr_linear_splitk_kernel, "fp16", c, cap, 2, 3)
        out.append([cap, "fp16", "splitk", found])
    print(json.dumps(out))
    """
)


def test_kernels_compile_for_sm80_and_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("this triton install has no ptxas")
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == 10
    for cap, dtype, kind, found in rows:
        assert found["async"], (cap, dtype, kind)
        if dtype != "fp32":  # fp32 runs exact IEEE products (no tensor cores)
            assert found["mma"] or found["wgmma"], (cap, dtype, kind, found)
        if cap == 90 and kind == "tiled" and dtype != "fp32":
            assert found["wgmma"], (cap, dtype, kind, found)  # Hopper's warp-group MMA
