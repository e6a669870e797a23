"""Compile every Triton kernel for an NVIDIA GPU without one: the CI's GPU compile check.

    python tests/kernels/gpu_compile_check.py            # representative variants, sm_90
    python tests/kernels/gpu_compile_check.py --all --arch 80

The interpreter checks what the kernels compute; this checks that the real NVIDIA backend
(TTIR → TTGIR → PTX → ptxas, shipped with triton) accepts them for the launch
configurations the GPU uses: tensor-core dots in each operand type (3xTF32/TF32/IEEE float32,
fp16, bf16, fp64), split-K atomics, implicit im2col, histograms and float64 atomics. Must run
in a process without TRITON_INTERPRET (the kernels would be interpreted functions).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cases(all_variants: bool):
    import triton.language as tl

    from spamkern.dispatch import kernel_module

    kf, kl, ko, ks = (kernel_module(n) for n in ("factors", "logdet", "opd", "select"))

    gram_types = [("fp32", "tf32x3"), ("fp32", "tf32"), ("fp32", "ieee"), ("fp16", "ieee"),
                  ("bf16", "ieee"), ("fp64", "ieee")]  # fmt: skip
    for dt, precision in gram_types if all_variants else [gram_types[0], gram_types[-1]]:
        acc = "fp64" if dt == "fp64" else "fp32"
        block_d, block_k, warps = (64, 16, 4) if dt == "fp64" else (128, 32, 8)
        for conv in (False, True):
            for atomic in (False, True) if all_variants else (conv,):
                types = {"x_ptr": f"*{dt}", "out_ptr": f"*{acc}", "alpha_ptr": f"*{acc}",
                         "tile_i_ptr": "*i32", "tile_j_ptr": "*i32"}  # fmt: skip
                consts = {"CONV": conv, "ATOMIC": atomic, "PRECISION": precision,
                          "ACC": tl.float64 if dt == "fp64" else tl.float32,
                          "BLOCK_D": block_d, "BLOCK_K": block_k}  # fmt: skip
                name = f"gram {dt} {precision} conv={conv} atomic={atomic}"
                yield name, kf._sym_gram_kernel, types, consts, warps, 3
    for dt in ("fp32", "fp64"):
        names = ("theta_ptr", "curv_ptr", "prior_ptr", "scale_ptr", "prec_ptr", "score_ptr")
        yield (
            f"opd {dt}",
            ko._precision_opd_kernel,
            dict.fromkeys(names, f"*{dt}"),
            {"BLOCK": 1024},
            4,
            1,
        )
        types = dict.fromkeys(
            ("theta_ptr", "g_ptr", "a_ptr", "prior_ptr", "scale_ptr", "prec_ptr", "score_ptr"),
            f"*{dt}",
        )
        types |= dict.fromkeys(
            ("prog_block_ptr", "prog_start_ptr", "blk_theta_ptr", "blk_g_ptr", "blk_a_ptr",
             "blk_na_ptr", "blk_size_ptr"),
            "*i64",
        )  # fmt: skip
        yield f"kron opd {dt}", ko._kron_precision_opd_kernel, types, {"BLOCK": 1024}, 4, 1
        bits = 32 if dt == "fp32" else 64
        key = "*i32" if bits == 32 else "*i64"
        rounds = range(bits // 8) if all_variants else (0, 1, bits // 8 - 1)
        for r in rounds:
            shift, first, last = bits - 8 * (r + 1), r == 0, r == bits // 8 - 1
            types = {"x_ptr": f"*{dt}", "hist_ptr": "*i32", "prefix_ptr": key}
            types |= dict.fromkeys(
                ("prog_seg_ptr", "prog_start_ptr", "seg_off_ptr", "seg_size_ptr"), "*i64"
            )
            consts = {"SHIFT": shift, "FIRST": first, "BITS": bits, "RADIX": 8, "BLOCK": 4096}
            yield f"radix hist {dt} round {r}", ks._radix_hist_kernel, types, consts, 4, 1
            types = {"hist_ptr": "*i32", "prefix_ptr": key, "krem_ptr": "*i32",
                     "k_ptr": "*i32", "out_ptr": f"*{dt}"}  # fmt: skip
            consts = {"SHIFT": shift, "FIRST": first, "LAST": last, "BITS": bits, "RADIX": 8}
            yield f"radix scan {dt} round {r}", ks._radix_scan_kernel, types, consts, 1, 1
        for need_grad in (False, True):
            types = dict.fromkeys(("l1_ptr", "l2_ptr", "delta_ptr", "scale_ptr"), f"*{dt}")
            types |= dict.fromkeys(("value_ptr", "gdelta_ptr", "gscale_ptr"), "*fp64")
            types |= dict.fromkeys(("prog_block_ptr", "prog_start_ptr", "meta_ptr"), "*i64")
            consts = {"NEED_GRAD": need_grad, "BLOCK": 1024}
            yield f"eig logdet {dt} grad={need_grad}", kl._eig_logdet_kernel, types, consts, 4, 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--all", action="store_true", help="every dtype/precision variant")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, fn, types, consts, warps, stages in _cases(args.all):
        signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=consts),
                target=target,
                options={"num_warps": warps, "num_stages": stages},
            )
            print(f"ok    sm_{args.arch} {name} (shared memory {compiled.metadata.shared} B)")
        except Exception as err:  # report every kernel, then fail
            failures += 1
            print(f"FAIL  sm_{args.arch} {name}: {type(err).__name__}: {err}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
