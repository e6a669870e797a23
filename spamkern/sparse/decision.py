"""Sparse or dense? Decided per shape and density from timings measured on this card.

A sparse kernel only pays above some sparsity that depends on the card, the shape and the
dtype, so a layer never guesses: it looks up timings of both paths recorded for this card
(:mod:`spamkern.sparse.tables`; the nearest entry with the same n, k, block and dtype, rows
within a factor 2 and density within 0.05, measured under the same conditions). Without one
it measures both paths on the real inputs, records the result and reuses it.
``SPAMKERN_SPARSE_MEASURE=0`` forbids measuring (then: sparse, and the choice says that
nothing was measured). Before measuring, every candidate's output is compared with the dense
one: a kernel that fails or disagrees on this card is dropped, and the choice says so.

One timing is noise on a busy machine, so the decision is made robust three ways:

* measurements are repeated: :data:`ROUNDS` rounds that alternate the paths, each path's time
  the median over its rounds (a burst of other work hits both paths, not one);
* sparse must win by a margin: it is chosen only when at most ``1 − SPARSE_MARGIN`` of dense's
  time (a tie goes to dense, whose kernels are the better tuned);
* above :data:`MAX_SPARSE_DENSITY` kept blocks a block-sparse product does nearly all of the
  dense work plus the indexing, so it cannot win: dense, without measuring.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spamkern.sparse import tables


@dataclass(frozen=True)
class Choice:
    """What a layer runs for one input shape, and why."""

    path: str  # "sparse" | "dense"
    backend: str  # the sparse backend, or "dense"
    reason: str
    sparse_ms: float | None = None
    dense_ms: float | None = None


SPARSE_MARGIN = 0.10  # sparse must take at most 90 % of dense's time to be chosen
MAX_SPARSE_DENSITY = 0.90  # above this fraction of kept blocks: dense, never measured
ROUNDS = 5  # alternating measurement rounds per decision (median per path)


def _measure_enabled() -> bool:
    return os.environ.get("SPAMKERN_SPARSE_MEASURE", "1") != "0"


def sparse_wins(sparse_ms: float, dense_ms: float) -> bool:
    """Sparse is chosen only when it beats dense by :data:`SPARSE_MARGIN`."""
    return sparse_ms <= (1.0 - SPARSE_MARGIN) * dense_ms


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """Median time of ``fn`` in milliseconds (CUDA: do_bench's median; CPU: perf_counter,
    with fewer repetitions for slow calls so a decision never costs more than a second)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    reps = max(1, min(reps, int(0.05 / max(first, 1e-6))))
    samples = [first]
    for _ in range(reps - 1):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def time_paths_ms(
    runs: dict[str, Callable[[], object]], device: torch.device, rounds: int = ROUNDS
) -> dict[str, float]:
    """Each path's median time over ``rounds`` rounds that visit the paths in turn, so that
    a stretch of load from other programs slows every path, not only the one it met."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(time_ms(run, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def _agreeing(
    candidates: dict[str, Callable[[], object]], run_dense: Callable[[], object], dtype
) -> tuple[list[str], list[str]]:
    """Candidates whose output matches the dense path's (a kernel that fails or disagrees on
    this card is never chosen), and why the others were dropped."""
    ref = run_dense()
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    scale = ref.abs().max().clamp_min(1e-6) if isinstance(ref, torch.Tensor) else None
    usable, rejected = [], []
    for name, run in candidates.items():
        try:
            out = run()
        except Exception as err:  # e.g. a kernel refusing this shape on this card
            rejected.append(f"{name} failed ({type(err).__name__}: {str(err)[:120]})")
            continue
        if scale is not None and isinstance(out, torch.Tensor):
            err = float((out.float() - ref.float()).abs().max() / scale.float())
            if not err <= tol:
                rejected.append(f"{name} disagrees with dense (relative error {err:.3g})")
                continue
        usable.append(name)
    return usable, rejected


def lookup(
    card: str,
    op: str,
    m: int,
    n: int,
    k: int,
    block,
    density: float,
    dtype: torch.dtype,
    backend: str | None = None,
) -> dict | None:
    """The nearest recorded timing for this case (and sparse ``backend``), or None."""
    dt = str(dtype).replace("torch.", "")
    best, best_dist = None, math.inf
    for entry in tables.load(card)["timings"]:
        if (
            entry.get("op") != op
            or entry.get("n") != n
            or entry.get("k") != k
            or list(entry.get("block", [])) != list(block)
            or entry.get("dtype") != dt
            or (backend is not None and entry.get("backend", backend) != backend)
        ):
            continue
        dm = abs(math.log2(max(1, entry["m"])) - math.log2(max(1, m)))
        dd = abs(entry["density"] - density)
        if dm > 1.0 or dd > 0.05:
            continue
        dist = dm + 20 * dd
        if dist <= best_dist:  # later (user) entries win ties
            best, best_dist = entry, dist
    return best


def decide(
    *,
    op: str,
    x: torch.Tensor,
    n: int,
    block,
    density: float,
    candidates: dict[str, Callable[[], object]],
    run_dense: Callable[[], object],
) -> Choice:
    """Choose dense or the fastest sparse backend among ``candidates`` (name → run) for
    input ``x`` (2-D), from recorded timings or, without any, fresh measurements."""
    if not candidates:
        raise ValueError("decide needs at least one sparse candidate backend")
    m, k = x.shape
    if density > MAX_SPARSE_DENSITY:
        return Choice(
            "dense", "dense", f"density {density:.2f} > {MAX_SPARSE_DENSITY}: sparse cannot win"
        )
    card = tables.card_name(x.device)
    found = {}
    for backend in candidates:
        entry = lookup(card, op, m, n, k, block, density, x.dtype, backend)
        if entry is not None:
            found[backend] = entry
    if found:
        backend, entry = min(found.items(), key=lambda item: item[1]["sparse_ms"])
        sparse_ms, dense_ms = entry["sparse_ms"], entry["dense_ms"]
        how = f"recorded on {card} for m={entry['m']}, density {entry['density']:.2f}"
    elif not _measure_enabled() or torch.compiler.is_compiling():
        backend = next(iter(candidates))
        return Choice("sparse", backend, f"no timing recorded for {card}; measuring is off")
    else:
        with torch.no_grad():
            usable, rejected = _agreeing(candidates, run_dense, x.dtype)
            if not usable:
                return Choice("dense", "dense", "dense: " + "; ".join(rejected))
            measured = time_paths_ms(
                {"dense": run_dense, **{name: candidates[name] for name in usable}}, x.device
            )
        dense_ms = measured.pop("dense")
        timings = measured
        for name, ms in timings.items():
            tables.record(
                card,
                timing={
                    "op": op,
                    "m": m,
                    "n": n,
                    "k": k,
                    "block": list(block),
                    "density": round(density, 4),
                    "dtype": str(x.dtype).replace("torch.", ""),
                    "sparse_ms": ms,
                    "dense_ms": dense_ms,
                    "backend": name,
                },
            )
        backend, sparse_ms = min(timings.items(), key=lambda item: item[1])
        how = f"measured now on {card}"
    path = "sparse" if sparse_wins(sparse_ms, dense_ms) else "dense"
    reason = (
        f"{how}: sparse ({backend}) {sparse_ms:.4g} ms vs dense {dense_ms:.4g} ms "
        f"(sparse needs a {SPARSE_MARGIN:.0%} lead)"
    )
    return Choice(path, backend if path == "sparse" else "dense", reason, sparse_ms, dense_ms)


def input_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` as (rows, in_features), the shape every sparse layer's kernels take."""
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, this layer expects {in_features}")
    return x.reshape(-1, in_features)
