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
    default_types = [gram_types[0], gram_types[3], gram_types[-1]]  # tf32x3, fp16, fp64
    for dt, precision in gram_types if all_variants else default_types:
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


def _block_sparse_cases(all_variants: bool):
    """The three block-sparse kernels: every dtype and flag, and (``--all``) every launch
    configuration the GPU tuner may pick for 64×64 fp16/bf16 blocks."""
    from spamkern.dispatch import kernel_module

    kb = kernel_module("block_sparse")
    kernels = {"tiled": kb._bsr_linear_kernel, "tiled_t": kb._bsr_linear_t_kernel,
               "splitk": kb._bsr_linear_splitk_kernel}  # fmt: skip

    def case(dtype, bn, bk, config, precision="ieee", even_k=False, bias=True):
        kind = config["kind"]
        types = dict.fromkeys(("x_ptr", "blocks_ptr", "bias_ptr", "y_ptr"), f"*{dtype}")
        types |= dict.fromkeys(("row_ptr", "col_idx", "row_order"), "*i32")
        types["y32_ptr"] = "*fp32"
        consts = {"BN": bn, "BK": bk, "BLOCK_M": config["BLOCK_M"], "HAS_BIAS": bias,
                  "EVEN_K": even_k, "UPCAST": False, "F32_PRECISION": precision}  # fmt: skip
        if kind == "tiled":
            consts["COL_SPLIT"] = config.get("COL_SPLIT", 1)
        if kind == "splitk":
            consts["SPLIT"] = config["SPLIT"]
        flags = ",".join(f"{k}={v}" for k, v in sorted(config.items()) if k != "kind")
        name = f"bsr {kind} {dtype} {precision} {bn}x{bk} even_k={even_k} bias={bias} {flags}"
        return name, kernels[kind], types, consts, config["num_warps"], config["num_stages"]

    tiled = {"kind": "tiled", "BLOCK_M": 128, "num_warps": 4, "num_stages": 3}
    decode = {"kind": "tiled", "BLOCK_M": 16, "num_warps": 4, "num_stages": 3}
    splitk = {"kind": "splitk", "BLOCK_M": 16, "SPLIT": 4, "num_warps": 2, "num_stages": 3}
    swapped = {"kind": "tiled_t", "BLOCK_M": 256, "num_warps": 8, "num_stages": 3}
    for dtype, precisions in (("fp16", ["ieee"]), ("bf16", ["ieee"]), ("fp32", ["ieee", "tf32"])):
        for precision in precisions:
            for config in (tiled, decode, splitk, swapped):
                yield case(dtype, 64, 64, config, precision)
            if all_variants:
                for bn, bk in ((32, 16), (128, 32), (16, 128)):
                    yield case(dtype, bn, bk, dict(tiled, BLOCK_M=64), precision, even_k=True)
                yield case(dtype, 64, 64, tiled, precision, even_k=True, bias=False)
    if all_variants:
        for dtype in ("fp16", "bf16"):
            for m in (1, 128):
                for config in kb.candidate_configs(m, 64, 64):
                    yield case(dtype, 64, 64, config)


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
    cases = [*_cases(args.all), *_block_sparse_cases(args.all)]
    for name, fn, types, consts, warps, stages in cases:
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
