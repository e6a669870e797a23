"""Dense vs compressed latency and FLOPs of a CIFAR ResNet and a small ViT.

    python bench/bench_compressed.py [--quick] [--out bench/results]   # JSON + plot
    python -m pytest bench/bench_compressed.py [--quick]                # pytest-benchmark

Units (ResNet: coupled channel groups; ViT: attention heads and MLP neurons) are removed
at 25/50/75 % of every group family (``scope="layerwise"``) by
``sk.prune(..., pattern="unit", example_inputs=x)`` and ``sk.compress`` (every
compressed model is checked against its masked model inside ``compress``).
Latency: forward passes in eval mode, batch 1 and 64, on the CPU with 1 thread (and on
a GPU when present); dense and compressed models are timed *interleaved*, round by
round, and each ratio is the median over rounds of dense time / compressed time, so a
busy machine slows both alike. FLOPs per sample: ``spamkern.pruning.count_flops``
(``torch.utils.flop_counter``: every matmul, attention products included). Targets
(CPU, 1 thread, batch 64): ResNet with 50 % of units removed ≥ 1.8× faster; ViT with half
its heads and MLP neurons removed ≥ 1.6× faster. ``--e2e`` adds a short SpaM (unitwise)
→ OPD → compress run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import spamkern as sk
from spamkern.models import resnet, vit
from spamkern.pruning import count_flops, count_params, magnitude_scores

FRACTIONS = (0.25, 0.5, 0.75)
BATCHES = (1, 64)
INPUT = (3, 32, 32)


def models(quick: bool) -> dict[str, torch.nn.Module]:
    """ResNet-20 (16/32/64) and a 4-block ViT (dim 192, 4 heads, MLP 768, 64 tokens)."""
    torch.manual_seed(0)
    if quick:
        return {
            "resnet": resnet(INPUT, 10, depth=8, widths=(8, 16, 32)),
            "vit": vit(INPUT, 10, dim=64, depth=2, n_heads=4, mlp_ratio=4, patch=4),
        }
    return {
        "resnet": resnet(INPUT, 10, depth=20, widths=(16, 32, 64)),
        "vit": vit(INPUT, 10, dim=192, depth=4, n_heads=4, mlp_ratio=4, patch=4),
    }


def compressed_variants(model: torch.nn.Module, x: torch.Tensor) -> dict[float, torch.nn.Module]:
    """The model with 25/50/75 % of the units of every coupled group family removed
    (magnitude scores, ``scope="layerwise"``: the same fraction everywhere)."""
    scores = magnitude_scores(model)
    out = {}
    for s in FRACTIONS:
        masks = sk.prune(model, scores, s, pattern="unit", scope="layerwise", example_inputs=x)
        out[s] = sk.compress(model, masks, example_inputs=x).eval()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def interleaved_times(
    named: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, inner: int
) -> dict[str, list[float]]:
    """Per-round mean forward time (s) of each model, the models timed in turn each round."""
    for m in named.values():
        for _ in range(2):
            m(x)
    _sync(x.device)
    times: dict[str, list[float]] = {k: [] for k in named}
    for _ in range(rounds):
        for key, m in named.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                m(x)
            _sync(x.device)
            times[key].append((time.perf_counter() - t0) / inner)
    return times


def _load_avg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def measure(quick: bool, device: torch.device) -> list[dict]:
    rows = []
    rounds = 5 if quick else 15
    for name, model in models(quick).items():
        model = model.to(device).eval()
        x_trace = torch.randn(2, *INPUT, device=device)
        variants = compressed_variants(model, x_trace)
        named = {"dense": model, **{f"{int(100 * s)}%": m for s, m in variants.items()}}
        f = {k: count_flops(m, INPUT) for k, m in named.items()}
        p = {k: count_params(m) for k, m in named.items()}
        for batch in BATCHES:
            x = torch.randn(batch, *INPUT, device=device)
            inner = max(1, (64 if device.type == "cuda" else 8) // batch) if batch == 1 else 1
            times = interleaved_times(named, x, rounds, inner)
            for key in named:
                ratios = [d / t for d, t in zip(times["dense"], times[key])]
                rows.append(
                    {
                        "model": name,
                        "removed": key,
                        "device": device.type,
                        "batch": batch,
                        "params": p[key],
                        "flops_per_sample": f[key],
                        "flop_ratio": f["dense"] / f[key],
                        "ms_median": 1e3 * statistics.median(times[key]),
                        "speedup_median": statistics.median(ratios),
                        "rounds": rounds,
                    }
                )
    return rows


def e2e(quick: bool) -> list[dict]:
    """SpaM (unitwise) → OPD unit pruning of coupled groups at 50 % (global and layerwise
    ranking) → compress → latency, each stage timed, on random 32×32 images (a workload
    timing, not an accuracy claim)."""
    out = []
    n = 256 if quick else 1024
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, *INPUT, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    for name, model in models(True).items():
        t0 = time.perf_counter()
        res = sk.marglik_train(
            model, (X, y), n_epochs=2, prior="unitwise", n_hypersteps=20, batch_size=128,
            progress=False,
        )  # fmt: skip
        t1 = time.perf_counter()
        for scope in ("global", "layerwise"):
            t2 = time.perf_counter()
            masks = sk.prune(
                model, res.posterior, 0.5, pattern="unit", scope=scope, example_inputs=X[:2]
            )
            small = sk.compress(model, masks, example_inputs=X[:2]).eval()
            t3 = time.perf_counter()
            times = interleaved_times({"dense": model.eval(), "small": small}, X[:64], 9, 1)
            ratios = [d / s for d, s in zip(times["dense"], times["small"])]
            out.append(
                {
                    "model": name,
                    "sizes": "quick",
                    "n_train": n,
                    "scope": scope,
                    "spam_s": t1 - t0,
                    "prune_and_compress_s": t3 - t2,
                    "units_removed": masks.sparsity(),
                    "params": [count_params(model), count_params(small)],
                    "flop_ratio": count_flops(model, INPUT) / count_flops(small, INPUT),
                    "speedup_batch64_cpu_1thread": statistics.median(ratios),
                }
            )
    return out


def environment() -> dict:
    """The suite's run conditions (card, versions, threads, load, date) plus the machine."""
    from conftest import run_conditions

    return run_conditions() | {
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "torch_pruning": importlib.metadata.version("torch-pruning"),
        "load_average_1_5_15": _load_avg(),
        "machine_busy": "shared build machine; ratios measured interleaved in one run",
    }


def plot(rows: list[dict], path: Path) -> None:
    from conftest import headless_pyplot

    plt = headless_pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, name in zip(axes, ("resnet", "vit")):
        for (dev, batch), style in zip(
            sorted({(r["device"], r["batch"]) for r in rows}), ("o-", "s-", "^--", "v--")
        ):
            pts = [
                r for r in rows if r["model"] == name and (r["device"], r["batch"]) == (dev, batch)
            ]
            xs = [0 if r["removed"] == "dense" else int(r["removed"][:-1]) for r in pts]
            ax.plot(xs, [r["speedup_median"] for r in pts], style, label=f"{dev}, batch {batch}")
        fl = [r for r in rows if r["model"] == name and r["batch"] == BATCHES[-1]]
        xs = [0 if r["removed"] == "dense" else int(r["removed"][:-1]) for r in fl]
        ax.plot(xs, [r["flop_ratio"] for r in fl], "k:", label="FLOP ratio")
        ax.set_title(name)
        ax.set_xlabel("% of units removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over dense (median)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models, few rounds")
    ap.add_argument("--e2e", action="store_true", help="also time SpaM → prune → compress")
    ap.add_argument(
        "--devices", default="all", choices=("all", "cpu", "cuda"),
        help="where to time: the CPU (1 thread) and the GPU when present (all), or one",
    )  # fmt: skip
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.devices == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_compressed: --devices cuda, but no CUDA device is present")
    torch.set_num_threads(1)
    rows = []
    if args.devices in ("all", "cpu"):
        rows += measure(args.quick, torch.device("cpu"))
    if args.devices in ("all", "cuda") and torch.cuda.is_available():
        rows += measure(args.quick, torch.device("cuda"))
    result = {"environment": environment(), "quick": args.quick, "rows": rows}
    if args.e2e:
        result["e2e"] = e2e(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compressed-quick" if args.quick else "compressed"
    if args.devices == "cuda":
        stem = f"{stem}-gpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / f"{stem}.png")
    for r in rows:
        print(
            f"{r['model']:6s} {r['device']} batch {r['batch']:3d} {r['removed']:>5s}: "
            f"{r['ms_median']:8.2f} ms  ×{r['speedup_median']:.2f}  FLOPs ×{r['flop_ratio']:.2f}"
        )
    for r in result.get("e2e", []):
        print(r)
    return result


# ---------------------------------------------------------------------------- pytest
def test_compressed_latency(benchmark, request):
    """pytest-benchmark: the compressed ViT and ResNet at 50 %, CPU, 1 thread, batch 64."""
    from conftest import quick_mode

    quick = quick_mode(request.config)
    torch.set_num_threads(1)
    x = torch.randn(64, *INPUT)
    small = {}
    for name, model in models(quick).items():
        small[name] = compressed_variants(model.eval(), x[:2])[0.5]
        assert count_flops(small[name], INPUT) < count_flops(model, INPUT)

    def run():
        with torch.no_grad():
            for m in small.values():
                m(x)

    benchmark.group = "compressed models, batch 64, 1 thread"
    benchmark.pedantic(run, rounds=3 if quick else 10, warmup_rounds=1)


if __name__ == "__main__":
    main()
