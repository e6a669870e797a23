"""Progress bars that stay quiet in logs: every loop of spamkern shows its bar through here.

A bar is drawn only when stderr is a terminal, so batch jobs, CI and redirected output get no
screens of carriage-return updates. ``SPAMKERN_PROGRESS=1`` forces bars on (e.g. in a
notebook whose stderr is not a tty), ``SPAMKERN_PROGRESS=0`` turns them all off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress_enabled(enabled: bool = True) -> bool:
    """Whether a bar asked for with ``enabled`` is drawn here."""
    forced = os.environ.get("SPAMKERN_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return enabled and forced == "1"
    if forced:
        raise ValueError(f"SPAMKERN_PROGRESS must be 0 or 1, got {forced!r}")
    stream = sys.stderr
    return enabled and stream is not None and hasattr(stream, "isatty") and stream.isatty()


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled unless :func:`progress_enabled` says otherwise."""
    return tqdm(iterable, disable=not progress_enabled(enabled), **kwargs)


def write(message: str) -> None:
    """Print a note to stderr above any running bar (the bars stay intact)."""
    tqdm.write(message, file=sys.stderr)
