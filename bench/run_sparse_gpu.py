"""Sparse-inference benchmark on one GPU: writes bench/results/<card>-sparse.json and a PNG.

Builds nothing: build the extension first (``python setup.py build_ext --inplace``; without
it the spamkern CUDA column is skipped), then from the repository root::

    python bench/run_sparse_gpu.py                  # target shapes, 2:4, MLP block
    python bench/run_sparse_gpu.py --quick          # fewer shapes (smoke run, ~1 min)
    python bench/run_sparse_gpu.py --write-tables   # also store the measured sparse/dense
                                                    # timings and tuned Triton configurations
                                                    # in spamkern/sparse/measured/<card>.json

Every time is the median of ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed
between repetitions), fp16 unless stated; every ratio is against dense ``F.linear`` with the
masked weight measured in this same run. Each output is checked against that dense result
before it is timed (``max_rel_err`` in the file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

BLOCK_CASES = [  # (m, k, n, sparsity) — the targets' shapes plus decode and 75 %
    (4096, 4096, 4096, 0.5),
    (4096, 4096, 4096, 0.75),
    (4096, 4096, 4096, 0.9),
    (4096, 4096, 4096, 0.95),
    (4096, 4096, 11008, 0.9),
    (64, 4096, 4096, 0.9),
    (16, 4096, 4096, 0.9),
]
QUICK_BLOCK_CASES = [BLOCK_CASES[0], BLOCK_CASES[2], BLOCK_CASES[5]]
SEMI_CASES = [(4096, 4096, 4096), (4096, 4096, 11008), (8192, 8192, 8192), (16384, 4096, 4096)]
TABLE_ROWS = (16, 64, 256, 1024, 4096)  # rows measured for the decision table
TABLE_SPARSITIES = (0.5, 0.75, 0.9, 0.95)


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def block_case(m, k, n, sparsity, block=(64, 64), dtype=torch.float16, seed=0):
    from spamkern.sparse import BlockSparseWeight

    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(n // block[0], k // block[1], generator=gen, device="cuda") >= sparsity
    w = torch.randn(n, k, generator=gen, device="cuda", dtype=dtype) / k**0.5
    sparse = BlockSparseWeight.from_dense(w, block, mask)
    x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
    return x, sparse, sparse.to_dense()


def run_block(cases, backends) -> list[dict]:
    from spamkern.sparse import bsr_linear

    rows = []
    for m, k, n, sparsity in cases:
        x, sparse, dense = block_case(m, k, n, sparsity)
        ref = F.linear(x, dense)
        row = {"m": m, "k": k, "n": n, "sparsity": sparsity, "block": [64, 64], "ms": {}}
        row["ms"]["dense"] = bench_ms(lambda: F.linear(x, dense))  # noqa: B023
        errs = {}
        try:
            bsr = dense.to_sparse_bsr((64, 64))
            errs["torch_bsr"] = rel_err(F.linear(x, bsr), ref)
            row["ms"]["torch_bsr"] = bench_ms(lambda: F.linear(x, bsr))  # noqa: B023
        except Exception as err:  # torch versions differ in BSR support
            row["torch_bsr_error"] = repr(err)[:200]
        for backend in backends:
            y = bsr_linear(x, sparse, None, backend=backend)  # tunes once (Triton)
            errs[f"spamkern_{backend}"] = rel_err(y, ref)
            row["ms"][f"spamkern_{backend}"] = bench_ms(
                lambda b=backend: bsr_linear(x, sparse, None, backend=b)  # noqa: B023
            )
        row["max_rel_err"] = errs
        row["speedup"] = {
            name: row["ms"]["dense"] / ms for name, ms in row["ms"].items() if name != "dense"
        }
        log(f"{m}x{k}x{n} {int(sparsity * 100)}%:", fmt(row))
        rows.append(row)
    return rows


def fmt(row) -> str:
    return ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()) + (
        f" (dense {row['ms']['dense']:.3f} ms)"
    )


def mask_2to4(n, k, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    keep = torch.rand(n, k // 4, 4, generator=gen, device="cuda").topk(2, dim=-1).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda")
    return mask.scatter_(-1, keep, True).reshape(n, k)


def run_semi(cases) -> list[dict]:
    from spamkern.sparse import SemiStructuredLinear

    rows = []
    for m, k, n in cases:
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
        mask = mask_2to4(n, k)
        w = lin.weight.detach() * mask
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = F.linear(x, w)
        row = {"m": m, "k": k, "n": n, "pattern": "2:4", "ms": {}, "max_rel_err": {}}
        row["ms"]["dense"] = bench_ms(lambda: F.linear(x, w))  # noqa: B023
        try:
            from torch.sparse import to_sparse_semi_structured

            ws = to_sparse_semi_structured(w)
            row["max_rel_err"]["torch_24"] = rel_err(F.linear(x, ws), ref)
            row["ms"]["torch_24"] = bench_ms(lambda: F.linear(x, ws))  # noqa: B023
        except Exception as err:
            row["torch_24_error"] = repr(err)[:200]
        with torch.no_grad():
            for mode in ("sparse", "auto"):
                layer = SemiStructuredLinear.from_dense(lin, mask, mode=mode)
                y = layer(x)
                row["max_rel_err"][f"spamkern_24_{mode}"] = rel_err(y, ref)
                row[f"choice_{mode}"] = layer.last_choice.reason
                row["ms"][f"spamkern_24_{mode}"] = bench_ms(lambda lay=layer: lay(x))  # noqa: B023
        row["speedup"] = {
            name: row["ms"]["dense"] / ms for name, ms in row["ms"].items() if name != "dense"
        }
        log(f"2:4 {m}x{k}x{n}:", fmt(row))
        rows.append(row)
    return rows


def run_mlp(sparsities) -> list[dict]:
    from spamkern.sparse import convert_to_block_sparse

    rows = []
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Linear(4096, 11008), torch.nn.GELU(), torch.nn.Linear(11008, 4096)
    )
    base = base.to("cuda", torch.float16).eval()
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        dense_ms = bench_ms(lambda: base(x))
        for sparsity in sparsities:
            gen = torch.Generator().manual_seed(1)
            masks = {
                f"{i}.weight": torch.rand(
                    base[i].out_features // 64, base[i].in_features // 64, generator=gen
                )
                >= sparsity
                for i in (0, 2)
            }
            model = convert_to_block_sparse(base, masks, block=(64, 64))
            model(x)  # choose paths (measures once per layer)
            ms = bench_ms(lambda m=model: m(x))
            choices = {str(i): model[i].last_choice.reason for i in (0, 2)}
            row = {"sparsity": sparsity, "dense_ms": dense_ms, "ms": ms}
            row["speedup"] = dense_ms / ms
            row["choices"] = choices
            log(f"MLP 4096-11008-4096 {int(sparsity * 100)}%: {row['speedup']:.2f}x", choices)
            rows.append(row)
    return rows


def run_tables(backends) -> None:
    """Measure sparse (each backend) and dense over rows × sparsities for the tables."""
    from spamkern.sparse import bsr_linear, tables

    card = tables.card_name(torch.device("cuda"))
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
        for sparsity in TABLE_SPARSITIES:
            for m in TABLE_ROWS:
                x, sparse, dense = block_case(m, k, n, sparsity)
                dense_ms = bench_ms(lambda: F.linear(x, dense))  # noqa: B023
                ref = F.linear(x, dense)
                for backend in backends:
                    err = rel_err(bsr_linear(x, sparse, None, backend=backend), ref)
                    if not err < 2e-2:  # never record a kernel that is wrong on this card
                        log(f"SKIP {backend} m={m} {k}->{n}: relative error {err:.3g}")
                        continue
                    sparse_ms = bench_ms(
                        lambda b=backend: bsr_linear(x, sparse, None, backend=b)  # noqa: B023
                    )
                    tables.record(
                        card,
                        timing={
                            "op": "bsr_linear",
                            "m": m,
                            "n": n,
                            "k": k,
                            "block": [64, 64],
                            "density": round(sparse.density, 4),
                            "dtype": "float16",
                            "sparse_ms": sparse_ms,
                            "dense_ms": dense_ms,
                            "backend": backend,
                        },
                    )
            log(f"table {k}->{n} {int(sparsity * 100)}% done")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["block_sparse"] + result["semi_structured"]
    labels = [
        f"{r['m']}x{r['k']}x{r['n']}\n"
        + (f"{int(r['sparsity'] * 100)}%" if "sparsity" in r else "2:4")
        for r in rows
    ]
    impls = sorted({name for r in rows for name in r["speedup"]})
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        vals = [r["speedup"].get(impl, 0.0) for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("speedup over dense F.linear")
    ax.set_title(f"{result['card']} — torch {result['torch']}, triton {result['triton']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--write-tables", action="store_true", help="store decision tables")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("run_sparse_gpu.py needs a CUDA GPU")
    if args.write_tables:
        # measured data goes straight into the package's table for this card
        os.environ["SPAMKERN_CACHE_DIR"] = str(ROOT / "spamkern" / "sparse" / "measured")
    from spamkern import _ext
    from spamkern.dispatch import available_backends
    from spamkern.sparse import tables

    backends = [b for b in ("triton", "cuda") if b in available_backends("bsr_linear")]
    card = torch.cuda.get_device_name()
    log(f"{card}; spamkern backends {backends}; extension: {_ext.LOAD_ERROR or 'loaded'}")
    result = {
        "card": card,
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dtype": "float16",
        "timer": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)",
        "spamkern_backends": backends,
        "extension": _ext.LOAD_ERROR or "loaded",
    }
    start = time.time()
    result["block_sparse"] = run_block(QUICK_BLOCK_CASES if args.quick else BLOCK_CASES, backends)
    result["semi_structured"] = run_semi(SEMI_CASES[:2] if args.quick else SEMI_CASES)
    result["mlp_block"] = run_mlp((0.5, 0.9) if args.quick else (0.5, 0.75, 0.9))
    if args.write_tables:
        run_tables(backends)
        result["tables_file"] = str(tables.cache_dir() / f"{tables.card_slug(card)}.json")
    result["wall_s"] = round(time.time() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{tables.card_slug(card)}-sparse"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    log(f"wrote {out / stem}.json and .png in {result['wall_s']} s")


if __name__ == "__main__":
    main()
