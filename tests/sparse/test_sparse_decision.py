"""The sparse-vs-dense decision holds up on a busy machine: repeated measurements, a margin,
density bounds, and a timing cache that knows the conditions it was measured under."""

from __future__ import annotations

import json
import time

import pytest
import torch

from spamkern.sparse import decision, tables


def _decide(density: float, sparse_ms: float, dense_ms: float, monkeypatch) -> decision.Choice:
    """A decision for a case whose measured timings are given."""
    fake = {"dense": dense_ms, "cpp": sparse_ms}
    monkeypatch.setattr(decision, "time_paths_ms", lambda runs, device: dict(fake))
    x = torch.randn(8, 64)
    return decision.decide(
        op="bsr_linear",
        x=x,
        n=64,
        block=(32, 32),
        density=density,
        candidates={"cpp": lambda: x @ torch.eye(64)},
        run_dense=lambda: x @ torch.eye(64),
    )


def test_full_density_is_dense_even_when_sparse_measured_faster(monkeypatch):
    choice = _decide(1.0, sparse_ms=0.5, dense_ms=1.0, monkeypatch=monkeypatch)
    assert choice.path == "dense" and "cannot win" in choice.reason
    assert list(tables.cache_dir().glob("*.json")) == []  # nothing measured, nothing cached


@pytest.mark.parametrize(("sparse_ms", "path"), [(0.95, "dense"), (0.9, "sparse"), (0.5, "sparse")])
def test_sparse_needs_a_margin(monkeypatch, sparse_ms, path):
    choice = _decide(0.4, sparse_ms=sparse_ms, dense_ms=1.0, monkeypatch=monkeypatch)
    assert choice.path == path, choice.reason


def test_recorded_timings_obey_the_margin():
    assert not decision.sparse_wins(0.95, 1.0)
    assert decision.sparse_wins(0.8, 1.0)


def test_paths_are_timed_by_median_of_alternating_rounds(monkeypatch):
    """A burst of load during a few measurements moves neither path's median."""
    calls: list[str] = []

    def path(name: str, ms: float):
        def run() -> float:  # "measured" time of this call (a slow burst at calls 2-4)
            calls.append(name)
            return ms + (20.0 if len(calls) in (2, 3, 4) else 0.0)

        return run

    monkeypatch.setattr(decision, "time_ms", lambda fn, device: fn())
    got = decision.time_paths_ms(
        {"a": path("a", 2.0), "b": path("b", 4.0)}, torch.device("cpu"), rounds=5
    )
    assert calls == ["a", "b"] * 5  # the paths alternate, round by round
    assert got == {"a": 2.0, "b": 4.0}


def test_time_ms_is_a_median_on_the_cpu():
    """One slow call among the timed repetitions does not set the time."""
    sleeps = iter([0.0, 0.0, 0.05] + [0.0] * 50)  # warm-up, first timed call, then a 50 ms hiccup
    assert decision.time_ms(lambda: time.sleep(next(sleeps)), torch.device("cpu")) < 25.0


def _timing(**over) -> dict:
    entry = {"op": "bsr_linear", "m": 8, "n": 64, "k": 64, "block": [32, 32], "density": 0.4,
             "dtype": "float32", "sparse_ms": 0.1, "dense_ms": 1.0, "backend": "cpp"}  # fmt: skip
    return entry | over


def test_cache_records_conditions_and_ignores_other_ones():
    card = tables.card_name(torch.device("cpu"))
    tables.record(card, timing=_timing())
    path = tables.cache_dir() / f"{tables.card_slug(card)}.json"
    stored = json.loads(path.read_text())["timings"][0]["conditions"]
    now = tables.conditions()
    assert stored["torch"] == torch.__version__ and stored["threads"] == torch.get_num_threads()
    assert {"date", "load", "busy"} <= set(stored)
    assert len(tables.load(card)["timings"]) == 1
    # entries measured under another torch, thread count, load state or long ago are ignored
    for other in (
        {"torch": "1.0.0"},
        {"threads": now["threads"] + 1},
        {"busy": not now["busy"]},
        {"date": "2001-01-01"},
    ):
        tables.record(card, timing=_timing(m=9, conditions=now | other))
    tables.forget_user_cache()
    assert [t["m"] for t in tables.load(card)["timings"]] == [8]
    assert not tables.same_conditions(None)


def test_cache_location_is_overridable(tmp_path, monkeypatch):
    card = tables.card_name(torch.device("cpu"))
    monkeypatch.setenv("SPAMKERN_CACHE_DIR", str(tmp_path / "elsewhere"))
    tables.forget_user_cache()
    tables.record(card, timing=_timing())
    assert (tmp_path / "elsewhere" / f"{tables.card_slug(card)}.json").is_file()
    monkeypatch.setenv("SPAMKERN_CACHE_DIR", "off")
    tables.forget_user_cache()
    assert tables.cache_dir() is None
    tables.record(card, timing=_timing())  # kept in memory only
    assert len(tables.load(card)["timings"]) == 1
    monkeypatch.delenv("SPAMKERN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tables.cache_dir() == tmp_path / "xdg" / "spamkern"
