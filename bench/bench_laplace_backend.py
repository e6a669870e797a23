"""laplace-torch's KronLaplace fit with spamkern as its backend, beside its own backends.

    python bench/bench_laplace_backend.py              # GPU: full sizes; CPU: --quick
    python -m pytest bench/bench_laplace_backend.py [--quick]   # the cases alone

The first command writes bench/results/<card>-laplace_backend.json (card, versions, date,
medians, speed-up of the spamkern backend over each laplace-torch backend).

Same model, same DataLoader, a fresh deep copy of the model per round (the ASDL backends
fail on a model another backend's hooks touched). Cases: KronLaplace.fit with SpamkernGGN,
CurvlinopsGGN (laplace-torch's default), AsdlGGN, SpamkernEF and AsdlEF on the full-size
MLP and CNN, plus one ``log_marginal_likelihood`` + backward (what ``marglik_training`` runs
per hyperstep), which does not depend on the backend.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import pytest
import torch

HAS_LAPLACE = importlib.util.find_spec("laplace") is not None
BACKENDS = ("SpamkernGGN", "CurvlinopsGGN", "AsdlGGN", "SpamkernEF", "AsdlEF")
pytestmark = pytest.mark.skipif(not HAS_LAPLACE, reason="laplace-torch is not installed")


class Problem:
    """A full-size benchmark model, its data behind a DataLoader (laplace-torch needs .dataset)."""

    def __init__(self, name: str, sizes, device: torch.device):
        from curvature_baselines import cnn, mlp
        from torch.utils.data import DataLoader, TensorDataset

        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        if name == "mlp":
            self.model, n, batch = mlp(), sizes.mlp_n, sizes.mlp_batch
            X = torch.randn(n, 784, generator=gen)
        else:
            self.model, n, batch = cnn(sizes.cnn_channels), sizes.cnn_n, sizes.cnn_batch
            X = torch.randn(n, 3, sizes.cnn_hw, sizes.cnn_hw, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        self.model = self.model.to(device)
        pin = device.type == "cuda"
        self.loader = DataLoader(TensorDataset(X, y), batch_size=batch, pin_memory=pin)
        self.name, self.n, self.batch = name, n, batch


_PROBLEMS: dict[str, Problem] = {}


@pytest.fixture(params=("mlp", "cnn"))
def problem(request, sizes, device) -> Problem:
    if request.param not in _PROBLEMS:
        _PROBLEMS[request.param] = Problem(request.param, sizes, device)
    return _PROBLEMS[request.param]


def _backend(name: str):
    import laplace.curvature

    if name.startswith("Spamkern"):
        import spamkern.integrations.laplace as ours

        return getattr(ours, name)
    return getattr(laplace.curvature, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_laplace_fit(benchmark, timed, problem, sizes, backend):
    from laplace import KronLaplace

    benchmark.group = f"laplace-torch KronLaplace.fit {problem.name}"
    benchmark.extra_info.update(
        model=problem.name, case=backend, n=problem.n, batch=problem.batch,
        threads=torch.get_num_threads(),
    )  # fmt: skip
    backend_cls = _backend(backend)

    def setup():
        return (copy.deepcopy(problem.model),), {}

    def fit(model):
        la = KronLaplace(model, "classification", backend=backend_cls)
        la.fit(problem.loader)
        return la

    timed(fit, sizes.rounds, setup=setup)


def test_log_marglik_and_backward(benchmark, timed, problem, sizes):
    """One hyperstep's evaluation on a fitted KronLaplace (layerwise prior)."""
    from laplace import KronLaplace

    from spamkern.integrations.laplace import SpamkernGGN

    benchmark.group = f"laplace-torch KronLaplace.fit {problem.name}"
    benchmark.extra_info.update(model=problem.name, case="log_marglik_backward", n=problem.n)
    la = KronLaplace(copy.deepcopy(problem.model), "classification", backend=SpamkernGGN)
    la.fit(problem.loader)
    p = next(problem.model.parameters())
    log_prec = torch.zeros(la.n_layers, device=p.device, dtype=p.dtype, requires_grad=True)

    def step():
        value = la.log_marginal_likelihood(log_prec.exp())
        value.backward()
        return value

    timed(step, max(sizes.rounds, 10))


# ---------------------------------------------------------------------------- runner
def _device_name() -> str:
    from spamkern.sparse.tables import card_name

    return card_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _card() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", _device_name()).strip("-").lower()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    """Run the cases (full sizes on a GPU, --quick on a CPU) and record them with ratios."""
    here = Path(__file__).resolve().parent
    quick = not torch.cuda.is_available() or "--quick" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q",
               f"--benchmark-json={raw}", "-p", "no:cacheprovider"]  # fmt: skip
        if quick:
            cmd.append("--quick")
        code = subprocess.call(cmd, cwd=here.parent)
        if code != 0 or not raw.exists():
            return code or 1
        data = json.loads(raw.read_text())
    cases: dict[str, dict[str, float]] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        cases.setdefault(info["model"], {})[info["case"]] = bench["stats"]["median"]
    pairs = (("CurvlinopsGGN", "SpamkernGGN"), ("AsdlGGN", "SpamkernGGN"), ("AsdlEF", "SpamkernEF"))
    ratios = {
        model: {f"{ref}/{ours}": t[ref] / t[ours] for ref, ours in pairs if {ref, ours} <= t.keys()}
        for model, t in cases.items()
    }
    threads = {b["extra_info"].get("threads") for b in data["benchmarks"]} - {None}
    record = {
        "card": _device_name(),
        "date": date.today().isoformat(),
        "sizes": "quick (CPU check, not the full sizes)" if quick else "full",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "laplace-torch": _version("laplace-torch"),
        "cpu_threads": sorted(threads),
        "median_s": cases,
        "speedup_of_spamkern": ratios,
    }
    out = here / "results" / f"{_card()}-laplace_backend.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
