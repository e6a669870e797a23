"""The hyperparameter update beyond MLPs: fixed-point against 100 Adam steps, same posterior.

    python bench/bench_hyper_models.py            # the table (CPU, 1 thread: about 1 min)
    python bench/bench_hyper_models.py --quick    # one model, one training length
    python -m pytest bench/bench_hyper_models.py  # the same cases, pytest-benchmark

``bench/bench_hyper.py`` times the update on an MLP; conv nets are where it used to go
wrong (dead units with flat precisions, shift curvatures that misjudge conv blocks). Here
LeNet on the 8×8 digits and LeNet-5 on the 28×28 digits (the main job's models), a
ResNet-8 and a two-block vision transformer on the 8×8 digits are trained as MAP for a few
epochs (float32, Adam 1e-3, batch 64), a Kronecker exact-GGN posterior is fitted at the
initial precision 1 for each prior, and both updates run from that start on the same
posterior: evidence evaluations, seconds and the final log evidence. Writes
``bench/results/cpu-hyper-models.json``.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import markdown_table, run_conditions, save_results, script_parser  # noqa: E402

import spamkern as sk  # noqa: E402
from spamkern.marglik.hyper import make_hyper_optimizer  # noqa: E402
from spamkern.models import lenet, lenet5, resnet, vit  # noqa: E402

GPU_MODE = False  # a CPU quality table; the GPU phase leaves it out
MODELS = {
    "lenet-digits": ("digits", lenet),
    "lenet5-digits28": ("digits28", lenet5),
    "resnet8-digits": ("digits", partial(resnet, depth=8, widths=(8, 16, 32))),
    "vit-digits": ("digits", partial(vit, dim=32, patch=2)),
}
PRIORS = ("scalar", "layerwise", "unitwise", "parameterwise")
EPOCHS = (2, 8)


def trained(model_name: str, epochs: int):
    """(model, training data) after ``epochs`` MAP epochs from seed 0."""
    dataset, factory = MODELS[model_name]
    data = sk.load_dataset(dataset)
    torch.manual_seed(0)
    model = factory(tuple(data.input_shape), data.n_classes)
    sk.marglik_train(
        model, data.train, n_epochs=epochs, n_epochs_burnin=epochs + 1, batch_size=64,
        scheduler=None, progress=False,
    )  # fmt: skip
    return model, data.train


def compare(model, train, prior: str) -> dict:
    """Both updates from the posterior's initial precisions."""
    post = sk.fit_laplace(model, train, prior=prior, progress=False)
    start = post.prior.log_precision.detach().clone()
    out = {}
    for method in ("adam", "fixed-point"):
        with torch.no_grad():
            post.prior.log_precision.copy_(start)
        opt = make_hyper_optimizer(method, post.prior)
        tic = time.perf_counter()
        value = opt.step(post)
        out[method] = {
            "evidence": value,
            "evaluations": opt.n_evaluations,
            "seconds": time.perf_counter() - tic,
        }
    out["fixed_point_minus_adam"] = out["fixed-point"]["evidence"] - out["adam"]["evidence"]
    return out


def measure(models, epochs_list) -> dict:
    cases = []
    for name in models:
        for epochs in epochs_list:
            model, train = trained(name, epochs)
            for prior in PRIORS:
                result = compare(model, train, prior)
                cases.append({"model": name, "epochs": epochs, "prior": prior, **result})
                fp = result["fixed-point"]
                print(
                    f"{name:16s} {epochs:2d} ep {prior:13s} fixed-point {fp['evaluations']:4d} "
                    f"evaluations {fp['seconds']:6.3f} s, "
                    f"evidence − Adam's {result['fixed_point_minus_adam']:+.3f}",
                    flush=True,
                )
    return {"run": run_conditions(), "cases": cases}


def markdown(result: dict) -> str:
    header = [
        "model", "MAP epochs", "prior", "fixed-point evaluations (s)", "Adam 100 steps (s)",
        "evidence: fixed-point − Adam",
    ]  # fmt: skip
    rows = [
        [
            c["model"],
            str(c["epochs"]),
            c["prior"],
            f"{c['fixed-point']['evaluations']} ({c['fixed-point']['seconds']:.3f})",
            f"{c['adam']['seconds']:.3f}",
            f"{c['fixed_point_minus_adam']:+.3f}",
        ]  # fmt: skip
        for c in result["cases"]
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__, "one model, one training length").parse_args(argv)
    torch.set_num_threads(1)
    models = ["lenet-digits"] if args.quick else list(MODELS)
    result = measure(models, EPOCHS[:1] if args.quick else EPOCHS)
    print(markdown(result))
    save_results(result, args.out, "cpu-hyper-models", args.quick)


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def lenet_digits():
    return trained("lenet-digits", EPOCHS[0])


@pytest.mark.parametrize("prior", PRIORS)
def test_hyper_models(benchmark, timed, lenet_digits, prior):
    benchmark.group = "hyper update lenet digits"
    benchmark.extra_info.update(prior=prior)
    result = timed(lambda: compare(*lenet_digits, prior), rounds=1)
    assert result["fixed-point"]["evaluations"] >= 1


if __name__ == "__main__":
    main()
