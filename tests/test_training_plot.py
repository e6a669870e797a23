"""The training-cost plot and summary (``bench/training_plot.py``, ``training_summary.py``)
report what the runs say."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "training_plot", ROOT / "bench" / "training_plot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def training_plot():
    return _load()


def _result() -> dict:
    return {
        "run": {"card": "CPU test", "threads": 1, "date": "2026-12-02T04:11:04+00:00"},
        "timing": {"repeats": 5},
        "ratios": {
            "plain_loop": 1.0,
            "map_marglik_train": 0.8,
            "spam_layerwise_ef_epoch": 1.7,
            "laplace_torch_AsdlEF": 8.5,
        },
        "relative": {"spam_parameterwise_ggn_refit/spam_layerwise_ggn_refit": 1.25},
        "targets": {
            "map_marglik_train": {"ratio": 0.8, "bound": 1.05, "met": True},
            "spam_layerwise_ef_epoch": {"ratio": 1.7, "bound": 1.5, "met": False},
            "spam_parameterwise_ggn_refit/spam_layerwise_ggn_refit": dict(
                ratio=1.25, bound=1.3, met=True
            ),
        },
    }


def test_bars_are_the_ratios_coloured_by_their_targets(training_plot, tmp_path):
    result = _result()
    path = tmp_path / "training.png"
    fig = training_plot.plot_training(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left, right = fig.axes[:2]
    bars = sorted(left.patches, key=lambda bar: -bar.get_y())  # top (first case) first
    assert [bar.get_width() for bar in bars] == list(result["ratios"].values())
    colours = [to_hex(bar.get_facecolor()) for bar in bars]
    expected = [
        training_plot.OTHER, training_plot.MET, training_plot.MISSED, training_plot.REFERENCE
    ]  # fmt: skip
    assert colours == expected
    # one black tick per targeted case, at its bound
    ticks = sorted(line.get_xdata()[0] for line in left.lines if line.get_gid() == "target")
    assert ticks == [1.05, 1.5]
    (relative_bar,) = [p for p in right.patches if p.get_width() > 0]
    assert relative_bar.get_width() == 1.25
    assert to_hex(relative_bar.get_facecolor()) == training_plot.MET


def test_command_line_writes_the_png_beside_the_json(tmp_path):
    source = tmp_path / "cpu-training.json"
    source.write_text(json.dumps(_result()))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "training_plot.py"), str(source)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert source.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    more = tmp_path / "later.json"
    more.write_text(json.dumps(_another(_result(), 1.4, True, "2026-12-02T05:00:00+00:00")))
    out = tmp_path / "both.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "training_plot.py"), str(source), str(more),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_needs_a_result(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "training_plot.py")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "the following arguments are required: result" in done.stderr


def _another(result: dict, ef: float, met: bool, date: str) -> dict:
    other = json.loads(json.dumps(result))
    other["run"]["date"] = date
    other["ratios"]["spam_layerwise_ef_epoch"] = ef
    other["targets"]["spam_layerwise_ef_epoch"] = {"ratio": ef, "bound": 1.5, "met": met}
    return other


def test_more_runs_add_their_range_and_how_often_each_target_was_met(training_plot, tmp_path):
    result = _result()
    others = [
        _another(result, 1.4, True, "2026-12-02T05:00:00+00:00"),
        _another(result, 1.9, False, "2026-12-02T05:10:00+00:00"),
        result,  # the headline among the runs counts once
    ]
    fig = training_plot.plot_training(result, tmp_path / "runs.png", others)
    left = fig.axes[0]
    y_of = {
        label.get_text(): tick for label, tick in zip(left.get_yticklabels(), left.get_yticks())
    }
    spans = {}
    for collection in left.collections:
        if collection.get_gid() == "range":
            for (x0, y0), (x1, _) in collection.get_segments():
                spans[y0] = (x0, x1)
    assert spans[y_of["spam_layerwise_ef_epoch"]] == (1.4, 1.9)
    assert y_of["plain_loop"] not in spans  # 1.0 in every run: no range to draw
    texts = [text.get_text() for text in left.texts]
    assert "1.70× (met 1/3)" in texts  # 1.7 missed, 1.4 met, 1.9 missed
    assert "0.80× (met 3/3)" in texts
    assert (
        "whiskers: all 3 runs, 2026-12-02 04:11 – 2026-12-02 05:10 UTC" in fig._suptitle.get_text()
    )


def test_runs_of_another_setting_are_refused(training_plot, tmp_path):
    result = _result() | {"setting": {"n": 4096, "epochs": 4}}
    other = result | {"setting": {"n": 512, "epochs": 2}}
    with pytest.raises(ValueError, match="only runs of one setting compare"):
        training_plot.plot_training(result, tmp_path / "mixed.png", [other])


def test_runs_from_before_the_model_was_recorded_count_as_mlp_runs(training_plot, tmp_path):
    result = _result() | {"setting": {"n": 4096, "epochs": 4, "model": "mlp"}}
    older = result | {"setting": {"n": 4096, "epochs": 4}}
    training_plot.plot_training(result, tmp_path / "mlp.png", [older])
    assert (tmp_path / "mlp.png").exists()
    lenet = result | {"setting": {"n": 4096, "epochs": 4, "model": "lenet5"}}
    with pytest.raises(ValueError, match="only runs of one setting compare"):
        training_plot.plot_training(lenet, tmp_path / "mixed.png", [older])


def _summary(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "training_summary.py"), *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_summary_gives_each_targets_spread_over_the_runs(tmp_path):
    result = _result()
    result["runs"] = {"cases": {"spam_layerwise_ef_epoch": [[1.7, 1.0], [1.5, 1.0], [3.0, 2.0]]}}
    others = [
        _another(result, 1.4, True, "2026-12-02T05:00:00+00:00"),
        _another(result, 1.9, False, "2026-12-02T05:10:00+00:00"),
    ]
    others[1]["runs"] = {}  # a run that kept no pairs
    paths = []
    for index, run in enumerate([result, *others]):
        paths.append(tmp_path / f"{index}.json")
        paths[-1].write_text(json.dumps(run))
    done = _summary(*paths)
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| `"): line for line in done.stdout.splitlines()}
    # EF: 1.7, 1.4, 1.9 -> range 1.40–1.90, median 1.70, one of three met; pair medians
    # 1.5 (1.7, 1.5, 1.5) in two runs -> 1.50 over the two runs that kept pairs
    assert rows["spam_layerwise_ef_epoch"] == (
        "| `spam_layerwise_ef_epoch` | ≤ 1.5 | 1.40–1.90 | 1.70 | 1 / 3 | 1.50 (2) |"
    )
    assert rows["map_marglik_train"].endswith("| 0.80–0.80 | 0.80 | 3 / 3 | – |")
    assert done.stdout.startswith("3 runs on CPU test, 2026-12-02T04:11:04+00:00 to ")


def test_summary_refuses_runs_of_another_setting(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_result() | {"setting": {"n": 4096}}))
    second.write_text(json.dumps(_result() | {"setting": {"n": 512}}))
    done = _summary(first, second)
    assert done.returncode != 0
    assert "only runs of one setting compare" in done.stderr
