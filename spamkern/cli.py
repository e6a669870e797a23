"""The main job: does SpaM + OPD keep accuracy under pruning better than MAP + baselines?

For every data set and seed: train a MAP model and a SpaM model from the same
initialisation, score every weight once per method (OPD on the SpaM posterior, the
baselines on the MAP model), prune at each sparsity level with the unstructured and the
unit (structured) pattern, optionally fine-tune with masks enforced, and evaluate on the
test split. Writes ``results.csv``, ``summary.md`` and ``accuracy_vs_sparsity.png`` into
``--out`` and prints the tables.

    spamkern                      # breast cancer (CancerNet) and digits (CNN), seeds 0 1 2
    spamkern --data mnist=/data --seeds 0 1 2 --finetune-epochs 5
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from spamkern.metrics import classification_metrics, glm_predictive, map_predictive
from spamkern.models import build_model
from spamkern.pruning import (
    OnlinePruning,
    apply_masks,
    compress,
    count_flops,
    count_params,
    finetune,
    grasp_scores,
    magnitude_scores,
    measure_latency,
    obd_scores,
    opd_scores,
    prune,
    random_scores,
    snip_scores,
    synflow_scores,
)

BUILTIN = ("breast_cancer", "digits")
LOCAL = ("mnist", "fashion_mnist", "cifar10")
SPARSITIES = (20, 40, 60, 70, 75, 80, 85, 90, 95, 99)
PATTERNS = ("unstructured", "unit")
# label → (which trained model is pruned, which score ranks its weights)
METHODS: dict[str, tuple[str, str]] = {
    "SpaM+OPD": ("spam", "opd"),
    "SpaM+magnitude": ("spam", "magnitude"),
    "MAP+OPD": ("map", "opd"),
    "MAP+magnitude": ("map", "magnitude"),
    "MAP+random": ("map", "random"),
    "MAP+SNIP": ("map", "snip"),
    "MAP+GraSP": ("map", "grasp"),
    "MAP+OBD": ("map", "obd"),
    "MAP+SynFlow": ("map", "synflow"),
}
CSV_FIELDS = (
    "dataset",
    "seed",
    "method",
    "model",
    "score",
    "pattern",
    "sparsity",
    "achieved_sparsity",
    "zero_fraction",
    "finetune_epochs",
    "predictive",
    "chance",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "params",
    "flops",
    "latency_ms",
)


@dataclass
class TrainConfig:
    """How one data set is trained (MAP and SpaM share everything but the prior updates)."""

    epochs: int
    lr: float
    optimizer: str
    scheduler: str | None
    batch_size: int
    burnin: int
    marglik_frequency: int
    hypersteps: int
    prior_precision: float = 1.0


# CancerNet: Adam 1e-3 (the paper's MLP setting). The small CNNs: Adam as well — SGD 0.1
# with momentum (the paper's CNN setting) diverged for the 8×8 digits CNN in our runs.
DEFAULT_TRAINING: dict[str, TrainConfig] = {
    "breast_cancer": TrainConfig(100, 1e-3, "adam", None, 32, 10, 5, 100),
    "digits": TrainConfig(60, 1e-3, "adam", "cosine", 64, 10, 5, 100),
    "mnist": TrainConfig(20, 1e-3, "adam", "cosine", 128, 5, 5, 100),
    "fashion_mnist": TrainConfig(20, 1e-3, "adam", "cosine", 128, 5, 5, 100),
    "cifar10": TrainConfig(40, 1e-3, "adam", "cosine", 128, 10, 5, 100),
}


# ---------------------------------------------------------------------------- arguments
def _dataset_spec(text: str) -> tuple[str, str | None]:
    name, _, root = text.partition("=")
    key = name.strip().lower()
    if key not in BUILTIN + LOCAL:
        raise argparse.ArgumentTypeError(
            f"unknown data set {name!r}; accepted: {', '.join(BUILTIN + LOCAL)} "
            "(local ones as NAME=FOLDER or with --data-root)"
        )
    return key, root or None


def _sparsity_percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"sparsity must be a number, got {text!r}") from err
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"sparsity is a percentage in [0, 100), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spamkern",
        description="Train MAP and SpaM models, prune them with OPD and the baselines at "
        "the paper's sparsity levels, and report accuracy, NLL, ECE and Brier.",
    )
    p.add_argument(
        "--data",
        nargs="+",
        type=_dataset_spec,
        default=[(d, None) for d in BUILTIN],
        metavar="NAME[=FOLDER]",
        help="data sets: breast_cancer, digits (built in), mnist, fashion_mnist, cifar10 "
        "(read from FOLDER or --data-root in torchvision's layout). Default: the built-in two",
    )
    p.add_argument("--data-root", default=None, help="folder of the local data sets")
    p.add_argument("--out", default="spamkern-results", help="output folder")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds, one run each (0 1 2)"
    )
    p.add_argument(
        "--prior",
        default="unitwise",
        choices=("scalar", "layerwise", "unitwise", "parameterwise"),
        help="SpaM prior (default unitwise)",
    )
    p.add_argument("--structure", default="kron", choices=("kron", "diag"))
    p.add_argument("--curvature", default="ggn", choices=("ggn", "ggn-mc", "ef"))
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs")
    p.add_argument("--burnin", type=int, default=None, help="override SpaM's burn-in epochs")
    p.add_argument("--marglik-frequency", type=int, default=None)
    p.add_argument("--hypersteps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="override the learning rate")
    p.add_argument(
        "--sparsities",
        nargs="+",
        type=_sparsity_percent,
        default=list(SPARSITIES),
        metavar="PERCENT",
    )
    p.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    p.add_argument(
        "--scope",
        default="global",
        choices=("global", "layerwise"),
        help="one threshold over all layers (default) or the same sparsity in every layer",
    )
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="fine-tune every pruned model this many epochs (same lr for all methods)",
    )
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument(
        "--online-sparsity",
        type=_sparsity_percent,
        default=None,
        metavar="PERCENT",
        help="also train a SpaM model pruned online by OPD during training, rising to "
        "PERCENT unstructured sparsity at the marglik steps (SPEC §6); off by default",
    )
    p.add_argument(
        "--latency-repeats",
        type=int,
        default=20,
        help="timed forward passes per structured model (batch 256, 1 thread)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the run")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 epochs, 2 hypersteps, marglik every epoch",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _config(name: str, args: argparse.Namespace) -> TrainConfig:
    cfg = copy.copy(DEFAULT_TRAINING[name])
    if args.quick:
        cfg.epochs, cfg.burnin, cfg.marglik_frequency, cfg.hypersteps = 2, 1, 1, 2
    for attr, value in (
        ("epochs", args.epochs),
        ("burnin", args.burnin),
        ("marglik_frequency", args.marglik_frequency),
        ("hypersteps", args.hypersteps),
        ("lr", args.lr),
    ):
        if value is not None:
            setattr(cfg, attr, value)
    if cfg.epochs < 1 or cfg.marglik_frequency < 1 or cfg.hypersteps < 0 or cfg.burnin < 0:
        raise ValueError(f"invalid training schedule for {name}: {cfg}")
    return cfg


def _check_local_root(name: str, root: str | None) -> None:
    if name in LOCAL:
        folder = root or os.environ.get("SPAMKERN_DATA")
        if folder is None:
            raise ValueError(
                f"data set {name!r} is read from a local folder: pass --data {name}=FOLDER "
                "or --data-root FOLDER (or set SPAMKERN_DATA)"
            )
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"the folder {folder!r} given for {name!r} does not exist")


# ---------------------------------------------------------------------------- one run
@dataclass
class Trained:
    """The two trained models of one (data set, seed) and their posteriors."""

    map_model: nn.Module
    spam_model: nn.Module
    map_posterior: Any
    spam_posterior: Any
    seconds: dict[str, float] = field(default_factory=dict)
    online_model: nn.Module | None = None
    online_masks: dict[str, torch.Tensor] | None = None


def _train(
    split, cfg: TrainConfig, args: argparse.Namespace, seed: int, device: torch.device
) -> Trained:
    import spamkern as sk

    torch.manual_seed(seed)
    init = build_model(split.input_shape, split.n_classes).to(device)
    common = {
        "n_epochs": cfg.epochs,
        "structure": args.structure,
        "curvature": args.curvature,
        "prior_precision": cfg.prior_precision,
        "lr": cfg.lr,
        "optimizer": cfg.optimizer,
        "scheduler": cfg.scheduler,
        "batch_size": cfg.batch_size,
        "progress": not args.no_progress,
        "seed": seed,
    }
    seconds = {}
    tic = time.perf_counter()
    # MAP: burn-in beyond the last epoch, so δ stays fixed (SPEC §5); its posterior uses a
    # scalar prior at that δ and serves MAP+OPD and the MAP model's Laplace predictive.
    map_res = sk.marglik_train(
        copy.deepcopy(init),
        split.train,
        prior="scalar",
        n_epochs_burnin=cfg.epochs + 1,
        marglik_frequency=1,
        n_hypersteps=0,
        **common,
    )
    seconds["train_map"] = time.perf_counter() - tic
    tic = time.perf_counter()
    spam_res = sk.marglik_train(
        copy.deepcopy(init),
        split.train,
        prior=args.prior,
        n_epochs_burnin=cfg.burnin,
        marglik_frequency=cfg.marglik_frequency,
        n_hypersteps=cfg.hypersteps,
        **common,
    )
    seconds["train_spam"] = time.perf_counter() - tic
    trained = Trained(map_res.model, spam_res.model, map_res.posterior, spam_res.posterior, seconds)
    if args.online_sparsity is not None:
        tic = time.perf_counter()
        schedule = OnlinePruning(
            final_sparsity=args.online_sparsity / 100.0,
            interval=cfg.marglik_frequency,
            scope=args.scope,
        )
        online_res = sk.marglik_train(
            copy.deepcopy(init),
            split.train,
            prior=args.prior,
            n_epochs_burnin=cfg.burnin,
            marglik_frequency=cfg.marglik_frequency,
            n_hypersteps=cfg.hypersteps,
            online_pruning=schedule,
            fit_final_posterior=False,
            **common,
        )
        trained.online_model, trained.online_masks = online_res.model, online_res.masks
        seconds["train_spam_online"] = time.perf_counter() - tic
    return trained


def _scores(method: str, trained: Trained, split, seed: int) -> torch.Tensor:
    which, score = METHODS[method]
    model = trained.spam_model if which == "spam" else trained.map_model
    posterior = trained.spam_posterior if which == "spam" else trained.map_posterior
    data = split.train
    if score == "opd":
        return opd_scores(posterior)
    if score == "magnitude":
        return magnitude_scores(model)
    if score == "random":
        return random_scores(model, torch.Generator().manual_seed(10_000 + seed))
    if score == "snip":
        return snip_scores(model, data)
    if score == "grasp":
        return grasp_scores(model, data)
    if score == "obd":
        return obd_scores(model, data)
    if score == "synflow":
        return synflow_scores(model, tuple(split.input_shape))
    raise ValueError(f"unknown score {score!r}")


def _zero_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(int((p == 0).sum()) for p in model.parameters()) / total


def _evaluate(model: nn.Module, split) -> dict[str, float]:
    x, y = split.test
    return classification_metrics(map_predictive(model, x), y)


def _row(dataset: str, seed: int, method: str, pattern: str, sparsity: float, **values) -> dict:
    which, score = METHODS.get(method, (method.split("+")[0].lower(), "-"))
    row = {k: "" for k in CSV_FIELDS}
    row.update(
        dataset=dataset,
        seed=seed,
        method=method,
        model=which,
        score=score,
        pattern=pattern,
        sparsity=sparsity,
    )
    row.update(values)
    return row


def run_one(
    name: str,
    root: str | None,
    seed: int,
    args: argparse.Namespace,
    device: torch.device,
    log: Callable[[str], None],
) -> list[dict]:
    """All rows of one (data set, seed)."""
    from spamkern.data import load_dataset

    split = load_dataset(name, root=root or args.data_root, seed=seed)
    split = type(split)(
        train=tuple(t.to(device) for t in split.train),
        test=tuple(t.to(device) for t in split.test),
        n_classes=split.n_classes,
        input_shape=tuple(split.input_shape),
        name=split.name,
    )
    cfg = _config(name, args)
    trained = _train(split, cfg, args, seed, device)
    shape = tuple(split.input_shape)
    rows = []
    dense_params = count_params(trained.map_model)
    dense_flops = count_flops(trained.map_model, shape)
    dense_latency = measure_latency(trained.map_model, shape, repeats=args.latency_repeats)
    x_test, y_test = split.test
    chance = float(torch.bincount(y_test).max()) / y_test.numel()
    for which, model, post in (
        ("MAP", trained.map_model, trained.map_posterior),
        ("SpaM", trained.spam_model, trained.spam_posterior),
    ):
        common = {
            "chance": chance,
            "achieved_sparsity": 0.0,
            "zero_fraction": _zero_fraction(model),
            "finetune_epochs": 0,
            "params": dense_params,
            "flops": dense_flops,
            "latency_ms": dense_latency,
        }
        rows.append(
            _row(
                name,
                seed,
                which,
                "dense",
                0.0,
                predictive="map",
                **common,
                **_evaluate(model, split),
            )
        )
        glm = classification_metrics(glm_predictive(post, x_test), y_test)
        rows.append(_row(name, seed, which, "dense", 0.0, predictive="glm", **common, **glm))

    jobs = [(m, p, s) for m in args.methods for p in args.patterns for s in args.sparsities]
    scores: dict[str, torch.Tensor] = {}
    bar = tqdm(jobs, desc=f"prune {name} seed {seed}", disable=args.no_progress, leave=False)
    tic = time.perf_counter()
    for method, pattern, pct in bar:
        if method not in scores:
            scores[method] = _scores(method, trained, split, seed).detach()
        which, _ = METHODS[method]
        base = trained.spam_model if which == "spam" else trained.map_model
        masks = prune(base, scores[method], pct / 100.0, pattern=pattern, scope=args.scope)
        pruned = apply_masks(copy.deepcopy(base), masks)
        if args.finetune_epochs > 0:
            finetune(
                pruned,
                split.train,
                masks,
                epochs=args.finetune_epochs,
                lr=args.finetune_lr,
                batch_size=cfg.batch_size,
                seed=seed,
                progress=False,
            )
        params, flops, latency = dense_params, dense_flops, ""
        if pattern == "unit":
            small = compress(pruned, masks)
            params, flops = count_params(small), count_flops(small, shape)
            latency = measure_latency(small, shape, repeats=args.latency_repeats)
        rows.append(
            _row(
                name,
                seed,
                method,
                pattern,
                pct,
                achieved_sparsity=masks.sparsity(),
                zero_fraction=_zero_fraction(pruned),
                finetune_epochs=args.finetune_epochs,
                predictive="map",
                chance=chance,
                params=params,
                flops=flops,
                latency_ms=latency,
                **_evaluate(pruned, split),
            )
        )
    if trained.online_model is not None:
        masks = trained.online_masks
        rows.append(
            _row(
                name,
                seed,
                "SpaM+online-OPD",
                "unstructured",
                args.online_sparsity,
                model="spam",
                score="opd-online",
                achieved_sparsity=masks.sparsity() if masks is not None else 0.0,
                zero_fraction=_zero_fraction(trained.online_model),
                finetune_epochs=0,
                predictive="map",
                chance=chance,
                params=dense_params,
                flops=dense_flops,
                **_evaluate(trained.online_model, split),
            )
        )
    seconds = dict(trained.seconds, prune_and_evaluate=time.perf_counter() - tic)
    log(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return rows


# ---------------------------------------------------------------------------- reporting
def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _group(rows: list[dict], key: Callable[[dict], tuple], field_name: str) -> dict:
    out: dict[tuple, list[float]] = {}
    for r in rows:
        if r[field_name] == "":
            continue
        out.setdefault(key(r), []).append(float(r[field_name]))
    return {k: _mean_std(v) for k, v in out.items()}


def accuracy_tables(rows: list[dict]) -> str:
    """Markdown: mean test accuracy (%) per method × sparsity, per data set and pattern.

    Every number here is under the MAP predictive (the GLM rows go to :func:`dense_table`).
    """
    rows = [r for r in rows if r["predictive"] == "map"]
    acc = _group(
        rows, lambda r: (r["dataset"], r["pattern"], r["method"], float(r["sparsity"])), "accuracy"
    )
    n_seeds = len({r["seed"] for r in rows})
    lines = []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for ds in datasets:
        dense = {
            m: acc[(ds, "dense", m, 0.0)][0]
            for m in ("MAP", "SpaM")
            if (ds, "dense", m, 0.0) in acc
        }
        for pattern in [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]:
            levels = sorted({float(r["sparsity"]) for r in rows if r["pattern"] == pattern})
            methods = list(dict.fromkeys(r["method"] for r in rows if r["pattern"] == pattern))
            lines.append(
                f"\n**{ds}, {pattern} pruning** — test accuracy (%), mean over {n_seeds} "
                f"seed(s); dense MAP {100 * dense.get('MAP', float('nan')):.1f}, dense SpaM "
                f"{100 * dense.get('SpaM', float('nan')):.1f}\n"
            )
            lines.append("| method | " + " | ".join(f"{s:g}%" for s in levels) + " |")
            lines.append("|---" * (len(levels) + 1) + "|")
            for m in methods:
                cells = []
                for s in levels:
                    if (ds, pattern, m, s) not in acc:
                        cells.append("–")
                        continue
                    mean, std = acc[(ds, pattern, m, s)]
                    cells.append(f"{100 * mean:.1f}" + (f"±{100 * std:.1f}" if n_seeds > 1 else ""))
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dense_table(rows: list[dict]) -> str:
    """Markdown: the unpruned models under the MAP and the Laplace (GLM probit) predictive."""
    keys = ("accuracy", "nll", "ece", "brier")
    stats = {
        k: _group(rows, lambda r: (r["dataset"], r["method"], r["predictive"]), k) for k in keys
    }
    lines = [
        "\n**Unpruned models** — MAP predictive vs Laplace GLM predictive (probit)\n",
        "| data set | model | predictive | accuracy % | NLL | ECE | Brier |",
        "|---|---|---|---|---|---|---|",
    ]
    for (ds, method, pred), (acc, _) in stats["accuracy"].items():
        if method not in ("MAP", "SpaM"):
            continue
        nll, ece, brier = (stats[k][(ds, method, pred)][0] for k in ("nll", "ece", "brier"))
        lines.append(
            f"| {ds} | {method} | {pred} | {100 * acc:.1f} | {nll:.3f} | {ece:.3f} | {brier:.3f} |"
        )
    return "\n".join(lines)


def compression_table(rows: list[dict]) -> str:
    """Markdown: compressed size and latency of the structured SpaM+OPD models."""
    sel = [r for r in rows if r["pattern"] == "unit" and r["method"] == "SpaM+OPD"]
    if not sel:
        return ""
    dense = [r for r in rows if r["method"] == "SpaM" and r["predictive"] == "map"]
    lines = [
        "\n**Structured SpaM+OPD, compressed** — parameters, FLOPs per sample, CPU latency "
        "(batch 256, 1 thread, median), mean over seeds\n",
        "| data set | units removed | params | FLOPs | latency ms | accuracy % |",
        "|---|---|---|---|---|---|",
    ]
    keys = ("params", "flops", "latency_ms", "accuracy")
    for ds in dict.fromkeys(r["dataset"] for r in sel):
        groups = [(0.0, [r for r in dense if r["dataset"] == ds])]
        for s in sorted({float(r["sparsity"]) for r in sel if r["dataset"] == ds}):
            groups.append((s, [r for r in sel if r["dataset"] == ds and float(r["sparsity"]) == s]))
        for s, rs in groups:
            avg = {k: sum(float(r[k]) for r in rs) / len(rs) for k in keys}
            lines.append(
                f"| {ds} | {s:g}% | {avg['params']:.0f} | {avg['flops']:.0f} | "
                f"{avg['latency_ms']:.3f} | {100 * avg['accuracy']:.1f} |"
            )
    return "\n".join(lines)


def verdict(rows: list[dict], ours: str = "SpaM+OPD", theirs: str = "MAP+magnitude") -> str:
    """Plain statement, per data set and pattern, of where ``ours`` beats ``theirs`` at 80–99 %.

    Seeds pair the two (same split, same initialisation). "Better" means not lower on any
    seed and at least 1 point higher on average ("worse" likewise); anything else is
    "mixed". Levels where both stay within 5 points of the majority-class rate are "both
    at chance level" (no winner there). Each level shows the mean difference and the
    seeds won-tied-lost.
    """
    per_seed: dict[tuple, float] = {}
    for r in rows:
        if r["pattern"] in PATTERNS:
            key = (r["dataset"], r["pattern"], r["method"], float(r["sparsity"]), r["seed"])
            per_seed[key] = float(r["accuracy"])
    chance = {r["dataset"]: float(r["chance"]) for r in rows if r["chance"] != ""}
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    lines = [
        f"\n**{ours} vs {theirs} at 80–99 % sparsity** (mean accuracy difference in points "
        f"over {len(seeds)} paired seed(s); seeds won-tied-lost)\n"
    ]
    order = ("better", "mixed", "worse", "both at chance level")
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for pattern in PATTERNS:
            levels = sorted(
                {
                    k[3]
                    for k in per_seed
                    if k[:3] == (ds, pattern, ours)
                    and 80 <= k[3] <= 99
                    and (ds, pattern, theirs, k[3], k[4]) in per_seed
                }
            )
            if not levels:
                continue
            verdicts: dict[str, list[str]] = {}
            for s in levels:
                pairs = [
                    (per_seed[(ds, pattern, ours, s, sd)], per_seed[(ds, pattern, theirs, s, sd)])
                    for sd in seeds
                    if (ds, pattern, ours, s, sd) in per_seed
                    and (ds, pattern, theirs, s, sd) in per_seed
                ]
                diffs = [100 * (a - b) for a, b in pairs]
                mean_diff = sum(diffs) / len(diffs)
                top = max(max(sum(a for a, _ in pairs), sum(b for _, b in pairs)) / len(pairs), 0)
                if top <= chance.get(ds, 0.0) + 0.05:
                    kind = "both at chance level"
                elif all(d >= 0 for d in diffs) and mean_diff >= 1.0:
                    kind = "better"
                elif all(d <= 0 for d in diffs) and mean_diff <= -1.0:
                    kind = "worse"
                else:
                    kind = "mixed"
                wtl = "-".join(
                    str(sum(1 for d in diffs if test(d)))
                    for test in (lambda d: d > 0, lambda d: d == 0, lambda d: d < 0)
                )
                verdicts.setdefault(kind, []).append(f"{s:g}% ({mean_diff:+.1f}, {wtl})")
            parts = [f"{k} at {', '.join(verdicts[k])}" for k in order if k in verdicts]
            lines.append(f"- {ds}, {pattern}: " + "; ".join(parts))
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs sparsity, one panel per data set × pattern, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    patterns = [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]
    acc = _group(
        rows, lambda r: (r["dataset"], r["pattern"], r["method"], float(r["sparsity"])), "accuracy"
    )
    fig, axes = plt.subplots(
        len(datasets),
        len(patterns),
        figsize=(5.5 * len(patterns), 3.8 * len(datasets)),
        squeeze=False,
    )
    for i, ds in enumerate(datasets):
        for j, pattern in enumerate(patterns):
            ax = axes[i][j]
            for method in METHODS:
                pts = sorted(
                    (s, v) for (d, p, m, s), v in acc.items() if (d, p, m) == (ds, pattern, method)
                )
                if not pts:
                    continue
                xs = [s for s, _ in pts]
                ys = [100 * v[0] for _, v in pts]
                bold = method in ("SpaM+OPD", "MAP+magnitude")
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    ms=3,
                    lw=2.4 if bold else 1.0,
                    label=method,
                    alpha=1.0 if bold else 0.75,
                )
            ax.set_title(f"{ds} — {pattern}")
            ax.set_xlabel("sparsity (%)" if pattern == "unstructured" else "units removed (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the main job; returns 0 (the console script ``spamkern`` calls this)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    if args.finetune_epochs < 0:
        parser.error(f"--finetune-epochs must be ≥ 0, got {args.finetune_epochs}")
    try:
        for name, root in args.data:
            _check_local_root(name, root or args.data_root)
            _config(name, args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    rows: list[dict] = []
    runs = [(name, root, seed) for name, root in args.data for seed in args.seeds]
    for name, root, seed in tqdm(runs, desc="spamkern", disable=args.no_progress):
        rows.extend(run_one(name, root, seed, args, device, log))
        write_csv(rows, out / "results.csv")  # partial results survive an interruption
    total = time.perf_counter() - started
    report = "\n".join(
        [
            f"# spamkern main job — {', '.join(n for n, _ in args.data)}; seeds "
            f"{' '.join(map(str, args.seeds))}; prior {args.prior}, structure {args.structure}; "
            f"{args.scope} scope; fine-tune epochs {args.finetune_epochs}; {total:.0f} s on "
            f"{args.threads} thread(s)",
            accuracy_tables(rows),
            dense_table(rows),
            compression_table(rows),
            verdict(rows),
            "",
        ]
    )
    (out / "summary.md").write_text(report)
    if not args.no_plot:
        plot(rows, out / "accuracy_vs_sparsity.png")
    print(report)
    print(
        f"wrote {out / 'results.csv'}, {out / 'summary.md'}"
        + ("" if args.no_plot else f", {out / 'accuracy_vs_sparsity.png'}")
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
