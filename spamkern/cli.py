"""The main job: does SpaM + OPD keep accuracy under pruning better than MAP + baselines?

For every data set and seed: train a MAP model and a SpaM model from the same
initialisation, score every weight once per method (OPD on the SpaM posterior, the
baselines on the MAP model), prune at each sparsity level with the unstructured and the
unit (structured) pattern, optionally fine-tune with masks enforced, and evaluate on the
test split. Writes ``results.csv``, ``summary.md`` and ``accuracy_vs_sparsity.png`` into
``--out`` and prints the tables. The work itself lives in :mod:`spamkern.experiment`.

    spamkern                      # breast cancer (CancerNet), digits (CNN) and digits28
                                  # (LeNet-5), seeds 0 1 2
    spamkern --data mnist=/data --seeds 0 1 2 --finetune-epochs 5
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from spamkern import progress
from spamkern.experiment import (
    BUILTIN,
    METHODS,
    PATTERNS,
    SPARSITIES,
    check_local_root,
    parse_dataset,
    plot,
    run_one,
    summary,
    training_config,
    write_csv,
)
from spamkern.models import MODEL_NAMES


# ---------------------------------------------------------------------------- arguments
def _dataset_spec(text: str) -> tuple[str, str | None]:
    """``--data`` items; argparse shows the message of an ArgumentTypeError verbatim."""
    try:
        return parse_dataset(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _sparsity_percent(text: str) -> float:
    """A percentage in [0, 100) with a message that says which rule the value broke."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"sparsity must be a number, got {text!r}") from err
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"sparsity is a percentage in [0, 100), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the main job, with the defaults the paper's setup uses."""
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
        help="data sets: breast_cancer, digits, digits28 (built in; digits28 = digits "
        "upsampled to 28×28, trained with LeNet-5), mnist, fashion_mnist, cifar10 (read "
        "from FOLDER or --data-root in torchvision's layout). Default: the built-in three",
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
    p.add_argument(
        "--model",
        default="auto",
        choices=MODEL_NAMES,
        help="network: auto (CancerNet for features, the CNN for images), resnet (ResNet-20) "
        "or vit (a small transformer); unit pruning of resnet/vit removes coupled groups",
    )
    p.add_argument(
        "--structure",
        default="kron",
        choices=("kron", "diag"),
        help="curvature structure: Kronecker factors per layer (default) or the diagonal",
    )
    p.add_argument(
        "--curvature",
        default="ggn",
        choices=("ggn", "ggn-mc", "ef"),
        help="exact GGN (default), its one-sample Monte Carlo estimate, or the empirical Fisher",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs")
    p.add_argument("--burnin", type=int, default=None, help="override SpaM's burn-in epochs")
    p.add_argument(
        "--marglik-frequency",
        type=int,
        default=None,
        help="override the epochs between hyperparameter (marginal-likelihood) steps",
    )
    p.add_argument(
        "--hypersteps",
        type=int,
        default=None,
        help="override the optimiser steps on the prior precisions per marglik step",
    )
    p.add_argument(
        "--hyper-tol",
        type=float,
        default=None,
        metavar="TOL",
        help="stop each marglik step's fixed-point update once an iteration gains less than "
        "TOL log evidence per data point (default 1e-6)",
    )
    p.add_argument("--lr", type=float, default=None, help="override the learning rate")
    p.add_argument(
        "--sparsities",
        nargs="+",
        type=_sparsity_percent,
        default=list(SPARSITIES),
        metavar="PERCENT",
        help="sparsity levels to prune to, in percent (default: the paper's levels)",
    )
    p.add_argument(
        "--patterns",
        nargs="+",
        choices=PATTERNS,
        default=list(PATTERNS),
        help="what is pruned: single weights or whole units (default: both)",
    )
    p.add_argument(
        "--scope",
        default="global",
        choices=("global", "layerwise"),
        help="one threshold over all layers (default) or the same sparsity in every layer",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=tuple(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help="pruning methods (default all): " + ", ".join(METHODS) + ". SpaM+sparsify is "
        "sk.sparsify's default on the SpaM model with data= (survivors re-solved on the "
        "training inputs), +rec(A) the same from the posterior's factors; MAP+sparsify and "
        "MAP+magnitude+rec put the MAP model through the same reconstruction",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="fine-tune every pruned model this many epochs (same lr for all methods)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=1e-3,
        help="Adam learning rate of the fine-tuning after pruning (default 1e-3)",
    )
    p.add_argument(
        "--online-sparsity",
        type=_sparsity_percent,
        default=None,
        metavar="PERCENT",
        help="also train a SpaM model pruned online by OPD during training, rising to "
        "PERCENT unstructured sparsity at the marglik steps (masks kept); off by default",
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


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad input before anything trains; ``parser.error`` exits with status 2."""
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    if args.finetune_epochs < 0:
        parser.error(f"--finetune-epochs must be ≥ 0, got {args.finetune_epochs}")
    if args.hyper_tol is not None and not 0 <= args.hyper_tol < math.inf:
        parser.error(f"--hyper-tol must be finite and ≥ 0, got {args.hyper_tol}")
    try:
        for name, root in args.data:
            check_local_root(name, root or args.data_root)
            training_config(name, args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


def _log(msg: str) -> None:
    """Progress notes go to stderr above the bars, keeping stdout for the report."""
    progress.write(msg)


# ---------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the main job; returns 0 (the console script ``spamkern`` calls this)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    rows: list[dict] = []
    runs = [(name, root, seed) for name, root in args.data for seed in args.seeds]
    bar = progress.progress_bar(runs, desc="spamkern", enabled=not args.no_progress)
    for name, root, seed in bar:
        rows.extend(run_one(name, root, seed, args, device, _log))
        write_csv(rows, out / "results.csv")  # partial results survive an interruption
    report = summary(rows, args, time.perf_counter() - started)
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
