"""What the main job runs: the data sets, sparsity levels, methods, result columns and the
training schedule of each data set.

Everything here is plain data plus the two checks that turn user input into it, so the
runner (:mod:`spamkern.experiment.run`) and the reports (:mod:`spamkern.experiment.report`)
agree on one vocabulary without importing each other.
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

BUILTIN = ("breast_cancer", "digits", "digits28")
LOCAL = ("mnist", "fashion_mnist", "cifar10")
SPARSITIES = (20, 40, 60, 70, 75, 80, 85, 90, 95, 99)
PATTERNS = ("unstructured", "unit")


class Method(NamedTuple):
    """One pruning method: which trained model, how entries are ranked, how survivors move.

    ``score`` is a score of :func:`spamkern.sparsify` (``opd``, ``obs``, ``prior``,
    ``kron``, ``magnitude``, or ``default`` for its ``method=None``) or one of the MAP
    baselines (``random``, ``snip``, ``grasp``, ``obd``, ``synflow``). ``reconstruct`` is
    ``none`` (pruned entries zeroed, nothing else moves), ``posterior`` (survivors re-solved
    from the posterior's Kronecker factors, data-free) or ``data`` (re-solved layer by layer
    on the pruned network's own training inputs).
    """

    model: str
    score: str
    reconstruct: str = "none"


BASELINE_SCORES = ("random", "snip", "grasp", "obd", "synflow")
SPARSIFY_SCORES = ("opd", "obs", "prior", "kron", "magnitude", "default")
RECONSTRUCTIONS = ("none", "posterior", "data")
# label → method; the main job's default list. "sparsify" = ``sk.sparsify``'s default method,
# "+rec" = reconstructed on the training inputs (``data=``), "+rec(A)" = from the posterior.
METHODS: dict[str, Method] = {
    "SpaM+OPD": Method("spam", "opd"),
    "SpaM+magnitude": Method("spam", "magnitude"),
    "SpaM+OBS": Method("spam", "obs"),
    "SpaM+prior": Method("spam", "prior"),
    "SpaM+sparsify": Method("spam", "default", "data"),
    "SpaM+sparsify+rec(A)": Method("spam", "default", "posterior"),
    "MAP+sparsify": Method("map", "default", "data"),
    "MAP+magnitude+rec": Method("map", "magnitude", "data"),
    "MAP+OPD": Method("map", "opd"),
    "MAP+magnitude": Method("map", "magnitude"),
    "MAP+random": Method("map", "random"),
    "MAP+SNIP": Method("map", "snip"),
    "MAP+GraSP": Method("map", "grasp"),
    "MAP+OBD": Method("map", "obd"),
    "MAP+SynFlow": Method("map", "synflow"),
}
# One result row: the runner fills these, the CSV and the tables read them.
CSV_FIELDS = (
    "dataset",
    "seed",
    "method",
    "model",
    "score",
    "reconstruct",
    "scope",
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


# Data sets trained with LeNet-5 (spamkern.models.lenet5) instead of the default model of
# their input shape: its first Linear layer follows conv + ReLU + pooling.
LENET5_SETS = ("digits28",)

# CancerNet: Adam 1e-3 (the paper's MLP setting). The small CNNs: Adam as well — SGD 0.1
# with momentum (the paper's CNN setting) diverged for the 8×8 digits CNN in our runs.
DEFAULT_TRAINING: dict[str, TrainConfig] = {
    "breast_cancer": TrainConfig(100, 1e-3, "adam", None, 32, 10, 5, 100),
    "digits": TrainConfig(60, 1e-3, "adam", "cosine", 64, 10, 5, 100),
    "digits28": TrainConfig(12, 1e-3, "adam", "cosine", 64, 2, 2, 50),
    "mnist": TrainConfig(20, 1e-3, "adam", "cosine", 128, 5, 5, 100),
    "fashion_mnist": TrainConfig(20, 1e-3, "adam", "cosine", 128, 5, 5, 100),
    "cifar10": TrainConfig(40, 1e-3, "adam", "cosine", 128, 10, 5, 100),
}


def parse_dataset(text: str) -> tuple[str, str | None]:
    """``NAME[=FOLDER]`` → (name, folder or None); ValueError names the accepted sets."""
    name, _, root = text.partition("=")
    key = name.strip().lower()
    if key not in BUILTIN + LOCAL:
        raise ValueError(
            f"unknown data set {name!r}; accepted: {', '.join(BUILTIN + LOCAL)} "
            "(local ones as NAME=FOLDER or with --data-root)"
        )
    return key, root or None


def training_config(name: str, args: argparse.Namespace) -> TrainConfig:
    """The data set's default schedule with ``--quick`` and the command-line overrides.

    Raises ValueError for a schedule that cannot run, so ``main`` can reject it up front
    instead of failing after the first data set has trained.
    """
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


def check_local_root(name: str, root: str | None) -> None:
    """Fail before any training when a local data set has no folder, or a missing one."""
    if name in LOCAL:
        folder = root or os.environ.get("SPAMKERN_DATA")
        if folder is None:
            raise ValueError(
                f"data set {name!r} is read from a local folder: pass --data {name}=FOLDER "
                "or --data-root FOLDER (or set SPAMKERN_DATA)"
            )
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"the folder {folder!r} given for {name!r} does not exist")
