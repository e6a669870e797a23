"""The README's API example runs as written (with fewer epochs, so the test stays short)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))
    text = README.read_text()
    block = re.search(r"```python\n(import spamkern as sk\n.*?)```", text, re.S).group(1)
    short = block.replace("n_epochs=60", "n_epochs=3").replace("n_hypersteps=100", "n_hypersteps=3")
    short = short.replace("n_epochs_burnin=10", "n_epochs_burnin=1").replace(
        "marglik_frequency=5", "marglik_frequency=1"
    )
    short = short.replace("interval=5", "interval=1")
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(short, str(README), "exec"), namespace)  # noqa: S102
    probs, masks, small = namespace["probs"], namespace["masks"], namespace["small"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))
    n_small = sum(p.numel() for p in small.parameters())
    n_full = sum(p.numel() for p in namespace["model"].parameters())
    assert n_small < n_full
    assert any(not bool(m.all()) for m in masks.values())
