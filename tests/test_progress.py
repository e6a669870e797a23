"""Progress bars are drawn on a terminal only, unless forced (SPAMKERN_PROGRESS)."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch import nn

import spamkern as sk
from spamkern.progress import progress_bar, progress_enabled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_follow_the_terminal_and_the_switch(monkeypatch):
    monkeypatch.delenv("SPAMKERN_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_enabled()
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert progress_enabled() and not progress_enabled(enabled=False)
    monkeypatch.setenv("SPAMKERN_PROGRESS", "0")
    assert not progress_enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("SPAMKERN_PROGRESS", "1")
    assert progress_enabled() and not progress_enabled(enabled=False)
    assert not progress_bar(range(3), enabled=True).disable
    monkeypatch.setenv("SPAMKERN_PROGRESS", "yes")
    with pytest.raises(ValueError, match="SPAMKERN_PROGRESS must be 0 or 1"):
        progress_enabled()


def test_fit_writes_no_bar_into_a_log(monkeypatch):
    """fit_laplace shows a bar by default, but not into a file or pipe."""
    monkeypatch.delenv("SPAMKERN_PROGRESS", raising=False)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, generator=gen).double(), torch.randint(0, 2, (10,), generator=gen)
    sk.fit_laplace(model, (x, y), batch_size=2)
    assert log.getvalue() == ""
