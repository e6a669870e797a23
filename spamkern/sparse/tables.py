"""Measured data per card: tuned Triton configurations and sparse-vs-dense timings.

Every machine kind ("card": a GPU name, or the CPU model with its thread count) has one JSON
file. Files shipped with the package live in ``spamkern/sparse/measured/``; what is measured at
run time is added to a file of the same name in the user cache (``$SPAMKERN_CACHE_DIR``, else
``~/.cache/spamkern``), which takes precedence. A file holds::

    {"card": ..., "triton_configs": {key: config},
     "timings": [{"op", "m", "n", "k", "block", "density", "dtype", "sparse_ms", "dense_ms",
                  "backend"}]}
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import warnings
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).with_name("measured")
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def card_name(device: torch.device) -> str:
    """The machine kind timings depend on: GPU name, or CPU model plus torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} x{torch.get_num_threads()}"


def card_slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")


def cache_dir() -> Path:
    return Path(os.environ.get("SPAMKERN_CACHE_DIR", Path.home() / ".cache" / "spamkern"))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # unreadable or corrupt: say so, then measure anew
        warnings.warn(
            f"ignoring the sparse timing table {path} ({err})", RuntimeWarning, stacklevel=3
        )
        return {}


@functools.lru_cache(maxsize=16)
def _shipped(card: str) -> dict:
    return _read(_PACKAGE_DIR / f"{card_slug(card)}.json")


_USER: dict[str, dict] = {}


def _user(card: str) -> dict:
    if card not in _USER:
        _USER[card] = _read(cache_dir() / f"{card_slug(card)}.json")
    return _USER[card]


def load(card: str) -> dict:
    """Shipped and user-measured data for ``card``, user entries last (they win)."""
    shipped, user = _shipped(card), _user(card)
    return {
        "card": card,
        "triton_configs": {**shipped.get("triton_configs", {}), **user.get("triton_configs", {})},
        "timings": list(shipped.get("timings", [])) + list(user.get("timings", [])),
    }


def record(card: str, *, triton_config: tuple[str, dict] | None = None, timing: dict | None = None):
    """Add a measured configuration or timing to the user cache file of ``card``."""
    with _LOCK:
        data = _user(card)
        data.setdefault("card", card)
        if triton_config is not None:
            data.setdefault("triton_configs", {})[triton_config[0]] = triton_config[1]
        if timing is not None:
            data.setdefault("timings", []).append(timing)
        path = cache_dir() / f"{card_slug(card)}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # read-only home: the in-memory copy still serves this process


def forget_user_cache() -> None:
    """Drop the in-memory copy of the user cache (tests point SPAMKERN_CACHE_DIR elsewhere)."""
    _USER.clear()
