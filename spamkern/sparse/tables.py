"""Measured data per card: tuned Triton configurations and sparse-vs-dense timings.

Every machine kind ("card": a GPU name, or the CPU model with its thread count) has one JSON
file. Files shipped with the package live in ``spamkern/sparse/measured/``; what is measured at
run time is added to a file of the same name in the user cache (``$SPAMKERN_CACHE_DIR``, else
``$XDG_CACHE_HOME/spamkern``, else ``~/.cache/spamkern``), which takes precedence.
``SPAMKERN_CACHE_DIR=off`` keeps measurements in memory only. A file holds::

    {"card": ..., "triton_configs": {key: config},
     "timings": [{"op", "m", "n", "k", "block", "density", "dtype", "sparse_ms", "dense_ms",
                  "backend", "conditions": {"torch", "threads", "date", "load", "busy"}}]}

A timing depends on more than the card: the torch build, the thread count and how busy the
machine was. Each entry records those :func:`conditions`; a user-cache entry is only used
under matching ones (:func:`same_conditions`). Shipped tables are measured on a quiet card by
the benchmark suite and are used on that card whatever the conditions.
"""

from __future__ import annotations

import datetime
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


# a machine whose 1-minute load per core is above this measures other programs' work too
BUSY_LOAD_PER_CORE = 0.5
# user-cache timings older than this are measured again (drivers, firmware, libraries move)
MAX_AGE_DAYS = 90


def cache_dir() -> Path | None:
    """Where measured timings persist (None: ``SPAMKERN_CACHE_DIR=off``, memory only)."""
    env = os.environ.get("SPAMKERN_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("off", "0", "none", "") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spamkern"


def load_per_core() -> float:
    """The 1-minute load average per CPU core (0.0 where the OS does not report one)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def conditions() -> dict:
    """What a timing measured now depends on besides the card and the case."""
    load = load_per_core()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
        "load": round(load, 2),
        "busy": load > BUSY_LOAD_PER_CORE,
    }


def same_conditions(recorded: dict | None, now: dict | None = None) -> bool:
    """Whether a timing recorded under ``recorded`` conditions holds now: same torch build,
    thread count and busy/quiet state, and measured within :data:`MAX_AGE_DAYS`."""
    if not recorded:
        return False
    now = now or conditions()
    if any(recorded.get(key) != now[key] for key in ("torch", "threads", "busy")):
        return False
    try:
        age = datetime.date.today() - datetime.date.fromisoformat(recorded["date"])
    except (KeyError, TypeError, ValueError):
        return False
    return age.days <= MAX_AGE_DAYS


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
        folder = cache_dir()
        _USER[card] = {} if folder is None else _read(folder / f"{card_slug(card)}.json")
    return _USER[card]


def load(card: str) -> dict:
    """Shipped and user-measured data for ``card``, user entries last (they win). User
    timings measured under other conditions than now's are left out."""
    shipped, user = _shipped(card), _user(card)
    now = conditions()
    fresh = [t for t in user.get("timings", []) if same_conditions(t.get("conditions"), now)]
    return {
        "card": card,
        "triton_configs": {**shipped.get("triton_configs", {}), **user.get("triton_configs", {})},
        "timings": list(shipped.get("timings", [])) + fresh,
    }


def record(card: str, *, triton_config: tuple[str, dict] | None = None, timing: dict | None = None):
    """Add a measured configuration or timing to the user cache file of ``card``."""
    with _LOCK:
        data = _user(card)
        data.setdefault("card", card)
        if triton_config is not None:
            data.setdefault("triton_configs", {})[triton_config[0]] = triton_config[1]
        if timing is not None:
            data.setdefault("timings", []).append({"conditions": conditions(), **timing})
        folder = cache_dir()
        if folder is None:
            return
        path = folder / f"{card_slug(card)}.json"
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
