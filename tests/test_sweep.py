"""The sweep's bookkeeping: method grid labels, per-level means and the quality targets."""

from __future__ import annotations

import math

import pytest

from spamkern.experiment import CSV_FIELDS, Method
from spamkern.experiment.sweep import (
    BASELINE,
    OURS,
    SAME_ON_MAP,
    accuracy_by_level,
    method_grid,
    quality_targets,
)


def _row(ds, seed, method, pattern, level, acc, scope="global") -> dict:
    row = dict.fromkeys(CSV_FIELDS, "")
    row.update(
        dataset=ds,
        seed=seed,
        method=method,
        pattern=pattern,
        sparsity=level,
        accuracy=acc,
        predictive="map",
        scope=scope if pattern != "dense" else "",
    )
    return row


def test_method_grid_labels():
    grid = method_grid(("spam", "map"), ("opd", "kron"), ("none", "data"))
    assert len(grid) == 8
    assert grid["SpaM+kron+data"] == Method("spam", "kron", "data")
    assert grid["MAP+opd+none"] == Method("map", "opd", "none")


def test_accuracy_by_level_mean_and_std():
    rows = [
        _row("digits", 0, "m", "unit", 40.0, 0.5),
        _row("digits", 1, "m", "unit", 40.0, 0.7),
        _row("digits", 0, "m", "unit", 40.0, 0.1, scope="layerwise"),
    ]
    rows.append({**rows[0], "predictive": "glm", "accuracy": 0.0})  # ignored
    acc = accuracy_by_level(rows)
    mean, std, n = acc[("digits", "unit", "m", "global", 40.0)]
    assert (n, round(mean, 9), round(std, 9)) == (2, 60.0, round(math.sqrt(200.0), 9))
    assert acc[("digits", "unit", "m", "layerwise", 40.0)][0] == pytest.approx(10.0)


def test_quality_targets_pass_and_fail():
    rows = [_row("digits28", 0, "SpaM", "dense", 0.0, 0.90)]
    # 80 %: +6 over the baseline (pass); 90 %: +4 (fail), 2.5 below the same call on MAP
    # (fail) and 3 below dense (pass)
    for level, ours, base, same in ((80.0, 0.89, 0.83, 0.89), (90.0, 0.87, 0.83, 0.895)):
        rows += [
            _row("digits28", 0, OURS, "unstructured", level, ours),
            _row("digits28", 0, BASELINE, "unstructured", level, base),
            _row("digits28", 0, SAME_ON_MAP, "unstructured", level, same),
        ]
    # breast cancer (114 test points): 0.8 points below passes, 1.8 below fails
    rows += [
        _row("breast_cancer", 0, OURS, "unit", 40.0, 0.950),
        _row("breast_cancer", 0, BASELINE, "unit", 40.0, 0.958),
        _row("breast_cancer", 0, OURS, "unit", 60.0, 0.940),
        _row("breast_cancer", 0, BASELINE, "unit", 60.0, 0.958),
    ]
    checks = {
        (c["dataset"], c["pattern"], c["sparsity"], c["check"].split(" ≥ ")[1]): c["passed"]
        for c in quality_targets(rows)
    }
    assert checks == {
        ("digits28", "unstructured", 80.0, f"{BASELINE} + 5"): True,
        ("digits28", "unstructured", 80.0, f"{SAME_ON_MAP} − 2"): True,
        ("digits28", "unstructured", 90.0, f"{BASELINE} + 5"): False,
        ("digits28", "unstructured", 90.0, f"{SAME_ON_MAP} − 2"): False,
        ("digits28", "unstructured", 90.0, "dense SpaM − 5"): True,
        ("breast_cancer", "unit", 40.0, f"{BASELINE} − 1 test point"): True,
        ("breast_cancer", "unit", 60.0, f"{BASELINE} − 1 test point"): False,
    }
