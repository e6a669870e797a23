"""The runner: one (data set, seed) → its result rows.

Train a MAP and a SpaM model from one initialisation (and, if asked, a SpaM model pruned
online), score every weight once per method, prune at each level and pattern, optionally
fine-tune with the masks enforced, and evaluate on the test split. Rows follow
:data:`~spamkern.experiment.config.CSV_FIELDS`.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spamkern.experiment.config import (
    CSV_FIELDS,
    LENET5_SETS,
    METHODS,
    Method,
    TrainConfig,
    training_config,
)
from spamkern.metrics import classification_metrics, glm_predictive, map_predictive
from spamkern.models import lenet5, model_by_name
from spamkern.progress import progress_bar
from spamkern.pruning import (
    OnlinePruning,
    apply_masks,
    compress,
    count_flops,
    count_params,
    finetune,
    grasp_scores,
    measure_latency,
    obd_scores,
    prune,
    random_scores,
    snip_scores,
    sparsify,
    synflow_scores,
)
from spamkern.pruning.scores import flatten_scores
from spamkern.pruning.sparsify import method_scores as sparsify_scores


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


@dataclass
class Dense:
    """What the pruned rows are measured against: the dense MAP model's cost and chance."""

    params: int
    flops: int
    latency_ms: float
    chance: float


@dataclass
class Run:
    """Everything one (data set, seed) shares, so the row builders need one argument."""

    name: str
    seed: int
    split: Any
    cfg: TrainConfig
    args: argparse.Namespace
    trained: Trained
    dense: Dense

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.split.input_shape)


# ---------------------------------------------------------------------------- training
def initial_model(split, model: str = "auto") -> nn.Module:
    """The untrained network of a data set: ``--model`` (:func:`spamkern.models.model_by_name`);
    with ``auto``, LeNet-5 for :data:`LENET5_SETS` (its first Linear layer follows conv +
    ReLU + pooling) and the default model of the input shape otherwise."""
    if model == "auto" and split.name in LENET5_SETS:
        return lenet5(tuple(split.input_shape), split.n_classes)
    return model_by_name(model, split.input_shape, split.n_classes)


def train_models(
    split, cfg: TrainConfig, args: argparse.Namespace, seed: int, device: torch.device
) -> Trained:
    """MAP and SpaM (and the online-pruned SpaM) from one seeded initialisation."""
    import spamkern as sk

    torch.manual_seed(seed)
    init = initial_model(split, args.model).to(device)
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
    # MAP: burn-in beyond the last epoch, so δ stays fixed; its posterior uses a
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
        hyper_tol=args.hyper_tol,
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
            hyper_tol=args.hyper_tol,
            online_pruning=schedule,
            fit_final_posterior=False,
            **common,
        )
        trained.online_model, trained.online_masks = online_res.model, online_res.masks
        seconds["train_spam_online"] = time.perf_counter() - tic
    return trained


# ---------------------------------------------------------------------------- scoring
def _model_and_posterior(method: Method, trained: Trained):
    if method.model == "spam":
        return trained.spam_model, trained.spam_posterior
    return trained.map_model, trained.map_posterior


def method_scores(method: str | Method, trained: Trained, split, seed: int) -> torch.Tensor:
    """One score per weight for a method without reconstruction (scores are reused for
    every level): OPD/OBS/prior from the posterior, the baselines from the model."""
    spec = METHODS[method] if isinstance(method, str) else method
    model, posterior = _model_and_posterior(spec, trained)
    data, score = split.train, spec.score
    if score in ("opd", "obs", "prior", "magnitude"):
        return flatten_scores(model, sparsify_scores(score, model, posterior))
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
    raise ValueError(f"score {score!r} has no fixed per-weight scores")


def uses_sparsify(method: Method) -> bool:
    """Reconstructed methods and the Kronecker/default selections go through sparsify."""
    return method.reconstruct != "none" or method.score in ("kron", "default")


@dataclass
class Pruned:
    """One pruned model: ``compressed`` when unit pruning already made it smaller."""

    model: nn.Module
    masks: Any
    score: str
    compressed: bool


def prune_with(
    method: Method, run: Run, pattern: str, pct: float, scores: torch.Tensor | None
) -> Pruned:
    """Prune the method's trained model to ``pct`` % (``scores`` for score-only methods)."""
    model, posterior = _model_and_posterior(method, run.trained)
    if not uses_sparsify(method):
        masks = prune(model, scores, pct / 100.0, pattern=pattern, scope=run.args.scope)
        return Pruned(apply_masks(copy.deepcopy(model), masks), masks, method.score, False)
    result = sparsify(
        model,
        posterior,
        pct / 100.0,
        pattern=pattern,
        scope=run.args.scope,
        method=None if method.score == "default" else method.score,
        data=run.split.train[0] if method.reconstruct == "data" else None,
        reconstruct=method.reconstruct,
    )
    return Pruned(result.model, result.masks, result.method, pattern == "unit")


# ---------------------------------------------------------------------------- evaluation
def zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero parameters: checks that masks survived fine-tuning."""
    total = sum(p.numel() for p in model.parameters())
    return sum(int((p == 0).sum()) for p in model.parameters()) / total


def evaluate(model: nn.Module, split) -> dict[str, float]:
    """Test accuracy, NLL, ECE and Brier under the MAP predictive."""
    x, y = split.test
    return classification_metrics(map_predictive(model, x), y)


def make_row(
    dataset: str,
    seed: int,
    method: str,
    pattern: str,
    sparsity: float,
    spec: Method | None = None,
    **values,
) -> dict:
    """A full CSV row: unset columns stay empty so every row has the same fields.

    ``spec`` describes the method (default: ``METHODS[method]``; the dense and online rows
    have none and name only their model).
    """
    if spec is None:
        spec = METHODS.get(method, Method(method.split("+")[0].lower(), "-", "-"))
    row = {k: "" for k in CSV_FIELDS}
    row.update(
        dataset=dataset,
        seed=seed,
        method=method,
        model=spec.model,
        score=spec.score,
        reconstruct=spec.reconstruct,
        pattern=pattern,
        sparsity=sparsity,
    )
    row.update(values)
    return row


# ---------------------------------------------------------------------------- one run
def _load_split(name: str, root: str | None, seed: int, device: torch.device):
    """The data set's split with every tensor moved to ``device`` once, up front."""
    from spamkern.data import load_dataset

    split = load_dataset(name, root=root, seed=seed)
    return type(split)(
        train=tuple(t.to(device) for t in split.train),
        test=tuple(t.to(device) for t in split.test),
        n_classes=split.n_classes,
        input_shape=tuple(split.input_shape),
        name=split.name,
    )


def _measure_dense(trained: Trained, split, repeats: int) -> Dense:
    """Cost of the dense MAP model and the majority-class accuracy of the test split."""
    shape = tuple(split.input_shape)
    params = count_params(trained.map_model)
    flops = count_flops(trained.map_model, shape)
    latency = measure_latency(trained.map_model, shape, repeats=repeats)
    y_test = split.test[1]
    chance = float(torch.bincount(y_test).max()) / y_test.numel()
    return Dense(params, flops, latency, chance)


def dense_rows(run: Run) -> list[dict]:
    """The unpruned MAP and SpaM models, each under the MAP and the GLM predictive."""
    rows = []
    x_test, y_test = run.split.test
    for which, model, post in (
        ("MAP", run.trained.map_model, run.trained.map_posterior),
        ("SpaM", run.trained.spam_model, run.trained.spam_posterior),
    ):
        common = {
            "chance": run.dense.chance,
            "achieved_sparsity": 0.0,
            "zero_fraction": zero_fraction(model),
            "finetune_epochs": 0,
            "params": run.dense.params,
            "flops": run.dense.flops,
            "latency_ms": run.dense.latency_ms,
        }
        metrics = evaluate(model, run.split)
        rows.append(
            make_row(run.name, run.seed, which, "dense", 0.0, predictive="map", **common, **metrics)
        )
        glm = classification_metrics(glm_predictive(post, x_test), y_test)
        rows.append(
            make_row(run.name, run.seed, which, "dense", 0.0, predictive="glm", **common, **glm)
        )
    return rows


def pruned_row(
    run: Run, label: str, method: Method, pattern: str, pct: float, scores: torch.Tensor | None
) -> dict:
    """Prune the method's model at ``pct`` %, fine-tune if asked, then measure and evaluate.

    Unit-pruned models are compressed before they are measured, so their size, FLOPs and
    latency are real (sparsify returns them compressed; the score-only path compresses
    after fine-tuning).
    """
    args, cfg = run.args, run.cfg
    pruned = prune_with(method, run, pattern, pct, scores)
    model = pruned.model
    if args.finetune_epochs > 0:
        finetune(
            model,
            run.split.train,
            None if pruned.compressed else pruned.masks,
            epochs=args.finetune_epochs,
            lr=args.finetune_lr,
            batch_size=cfg.batch_size,
            seed=run.seed,
            progress=False,
        )
    params, flops, latency = run.dense.params, run.dense.flops, ""
    if pattern == "unit":
        small = model if pruned.compressed else compress(model, pruned.masks)
        params, flops = count_params(small), count_flops(small, run.shape)
        latency = measure_latency(small, run.shape, repeats=args.latency_repeats)
    return make_row(
        run.name,
        run.seed,
        label,
        pattern,
        pct,
        spec=method._replace(score=pruned.score),
        scope=args.scope,
        achieved_sparsity=pruned.masks.sparsity(),
        zero_fraction=zero_fraction(model),
        finetune_epochs=args.finetune_epochs,
        predictive="map",
        chance=run.dense.chance,
        params=params,
        flops=flops,
        latency_ms=latency,
        **evaluate(model, run.split),
    )


def pruned_rows(run: Run, methods: dict[str, Method] | None = None) -> list[dict]:
    """Every method × pattern × level (``methods``: label → method, default the
    ``--methods`` of the main job); score-only methods are scored once, on first use."""
    args = run.args
    if methods is None:
        methods = {label: METHODS[label] for label in args.methods}
    jobs = [(m, p, s) for m in methods for p in args.patterns for s in args.sparsities]
    scores: dict[str, torch.Tensor] = {}
    bar = progress_bar(
        jobs, desc=f"prune {run.name} seed {run.seed}", enabled=not args.no_progress, leave=False
    )
    rows = []
    for label, pattern, pct in bar:
        method = methods[label]
        if not uses_sparsify(method) and label not in scores:
            scores[label] = method_scores(method, run.trained, run.split, run.seed).detach()
        rows.append(pruned_row(run, label, method, pattern, pct, scores.get(label)))
    return rows


def _online_row(run: Run) -> dict:
    """The SpaM model pruned by OPD during training, evaluated as it came out."""
    model, masks = run.trained.online_model, run.trained.online_masks
    return make_row(
        run.name,
        run.seed,
        "SpaM+online-OPD",
        "unstructured",
        run.args.online_sparsity,
        model="spam",
        score="opd-online",
        reconstruct="none",
        achieved_sparsity=masks.sparsity() if masks is not None else 0.0,
        zero_fraction=zero_fraction(model),
        finetune_epochs=0,
        predictive="map",
        chance=run.dense.chance,
        params=run.dense.params,
        flops=run.dense.flops,
        **evaluate(model, run.split),
    )


def prepare_run(
    name: str, root: str | None, seed: int, args: argparse.Namespace, device: torch.device
) -> Run:
    """Load the data set, train its MAP and SpaM models and measure the dense MAP model:
    everything the pruned rows of one (data set, seed) share."""
    split = _load_split(name, root or args.data_root, seed, device)
    cfg = training_config(name, args)
    trained = train_models(split, cfg, args, seed, device)
    dense = _measure_dense(trained, split, args.latency_repeats)
    return Run(name, seed, split, cfg, args, trained, dense)


def run_one(
    name: str,
    root: str | None,
    seed: int,
    args: argparse.Namespace,
    device: torch.device,
    log: Callable[[str], None],
) -> list[dict]:
    """All rows of one (data set, seed); logs the seconds each stage took."""
    run = prepare_run(name, root, seed, args, device)
    rows = dense_rows(run)
    tic = time.perf_counter()
    rows.extend(pruned_rows(run))
    if run.trained.online_model is not None:
        rows.append(_online_row(run))
    seconds = dict(run.trained.seconds, prune_and_evaluate=time.perf_counter() - tic)
    log(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return rows
