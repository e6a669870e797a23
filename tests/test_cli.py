"""The main job on a tiny configuration, and its errors for bad input."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest

from spamkern.cli import main
from spamkern.experiment import METHODS


def _rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_quick_run_writes_consistent_results(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(
        [
            "--data", "breast_cancer", "digits",
            "--quick", "--seeds", "3", "--sparsities", "50", "90",
            "--methods", "SpaM+OPD", "MAP+magnitude", "MAP+SNIP", "SpaM+sparsify",
            "--finetune-epochs", "1", "--online-sparsity", "60",
            "--latency-repeats", "2",
            "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    rows = _rows(out / "results.csv")
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert "SpaM+OPD vs MAP+magnitude" in (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert "| SpaM+OPD |" in printed
    for ds in ("breast_cancer", "digits"):
        mine = [r for r in rows if r["dataset"] == ds]
        dense = [r for r in mine if r["pattern"] == "dense"]
        assert {(r["method"], r["predictive"]) for r in dense} == {
            (m, p) for m in ("MAP", "SpaM") for p in ("map", "glm")
        }
        online = [r for r in mine if r["method"] == "SpaM+online-OPD"]
        assert len(online) == 1 and abs(float(online[0]["achieved_sparsity"]) - 0.6) < 1e-3
        pruned = [r for r in mine if r["pattern"] != "dense" and r not in online]
        assert len(pruned) == 4 * 2 * 2  # methods × patterns × sparsities
        for r in pruned:
            assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["nll"]) > 0
            assert r["finetune_epochs"] == "1"
            target = float(r["sparsity"]) / 100
            if r["pattern"] == "unstructured":
                assert abs(float(r["achieved_sparsity"]) - target) < 1e-3
                assert int(r["params"]) == int(dense[0]["params"])
            else:  # unit: compressed, so fewer parameters and FLOPs than dense
                assert abs(float(r["achieved_sparsity"]) - target) < 0.05
                assert int(r["params"]) < int(dense[0]["params"])
                assert int(r["flops"]) < int(dense[0]["flops"])
                assert float(r["latency_ms"]) > 0
        assert {r["method"] for r in pruned} == {
            "SpaM+OPD", "MAP+magnitude", "MAP+SNIP", "SpaM+sparsify"
        }  # fmt: skip
        rec = {r["reconstruct"] for r in pruned if r["method"] == "SpaM+sparsify"}
        assert rec == {"data"}
        assert {r["reconstruct"] for r in pruned if r["method"] != "SpaM+sparsify"} == {"none"}
        dense_map = next(r for r in dense if r["method"] == "MAP" and r["predictive"] == "map")
        assert f"dense MAP {100 * float(dense_map['accuracy']):.1f}" in printed
    assert set(METHODS) >= {"SpaM+OPD", "MAP+OBD", "MAP+GraSP", "MAP+SynFlow", "MAP+random"}
    assert set(METHODS) >= {"SpaM+sparsify", "MAP+sparsify", "MAP+magnitude+rec"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "imagenet"], "unknown data set 'imagenet'"),
        (["--data", "mnist=/nonexistent/folder"], "does not exist"),
        (["--data", "cifar10"], "local folder"),
        (["--sparsities", "100"], r"\[0, 100\)"),
        (["--patterns", "2:4"], "invalid choice"),
        (["--threads", "0"], "--threads"),
        (["--hyper-tol=-1e-6"], "--hyper-tol must be finite"),
        (["--hyper-tol", "nan"], "--hyper-tol must be finite"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("SPAMKERN_DATA", raising=False)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--no-progress"])
    assert exc.value.code == 2

    assert re.search(message, capsys.readouterr().err)


def test_module_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "spamkern", "--help"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and "--finetune-epochs" in res.stdout


def test_hyper_tol_reaches_every_spam_run(tmp_path, monkeypatch):
    """--hyper-tol is passed to the SpaM trainings (offline and online), not the MAP one."""
    import spamkern as sk

    seen, train = [], sk.marglik_train

    def recording(*args, **kwargs):
        seen.append((kwargs.get("n_hypersteps"), kwargs.get("hyper_tol")))
        return train(*args, **kwargs)

    monkeypatch.setattr(sk, "marglik_train", recording)
    argv = [
        "--data", "breast_cancer", "--quick", "--sparsities", "50", "--methods", "SpaM+OPD",
        "--online-sparsity", "50", "--hyper-tol", "1e-4", "--no-plot", "--no-progress",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    map_runs = [tol for steps, tol in seen if steps == 0]
    spam_runs = [tol for steps, tol in seen if steps != 0]
    assert map_runs and set(map_runs) == {None}  # one per seed
    assert spam_runs == [1e-4] * (2 * len(map_runs))  # offline and online, per seed
