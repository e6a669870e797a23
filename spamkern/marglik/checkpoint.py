"""Checkpoints of a marginal-likelihood run: everything needed to continue it exactly.

Saved: model, optimisers, scheduler, prior, log σ, epoch, history, masks and every random
state the run draws from (torch's global CPU/CUDA state, the batch-shuffling and MC
generators). Written by rank 0 only.

File format: one header line and the ``torch.save`` bytes of the payload::

    SPAMKERN-CHECKPOINT
    v1 sha256=<64 hex digits of the payload> bytes=<payload length>
    <payload>

The file is written to a temporary file in the same folder, flushed to disk (fsync) and
renamed over the old one (``os.replace``), so a crash leaves the previous checkpoint or the
new one, never half of one. On loading, the header, the length and the checksum are checked
before a byte is unpickled: a damaged file (truncated, bytes flipped, empty, another format)
raises :class:`CheckpointError` naming the file and what is wrong, instead of resuming from
corrupted state or failing deep inside pickle.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from spamkern.distributed import check_same_on_all_ranks, rank, world_size

MAGIC = b"SPAMKERN-CHECKPOINT\n"
VERSION = 1
_HEADER = re.compile(rb"v(\d+) sha256=([0-9a-f]{64}) bytes=(\d+)\n")
_MAX_HEADER = 128  # the version line is ~90 bytes
RESUME_MODES = (False, True, "if-exists")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: damaged, truncated or of another format."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} {problem}")
        self.path = path


def rng_state(generators: dict[str, torch.Generator | None]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in generators.items():
        if gen is not None:
            state[name] = gen.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator | None]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        if gen is not None and name in state:
            gen.set_state(state[name])


def should_resume(resume: bool | str, path: str | os.PathLike | None) -> bool:
    """Whether to continue from the checkpoint at ``path``.

    ``resume=True`` requires the checkpoint (a missing one is an error, not a silent fresh
    start: a typo in the path would otherwise throw the run away); ``resume="if-exists"``
    continues from it when it exists and starts afresh otherwise — the idiom for a job
    script that is simply rerun after being killed.
    """
    if not (isinstance(resume, bool) or resume == "if-exists"):
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
    if path is not None and Path(path).is_dir():
        raise ValueError(f"checkpoint_path {path} is a folder; give a file name inside it")
    if resume is False:
        return False
    if path is None:
        raise ValueError(f"resume={resume!r} needs a checkpoint_path")
    exists = Path(path).is_file()
    check_same_on_all_ranks(int(exists), "answers to 'does the checkpoint exist'")
    if not exists and resume is True:
        raise FileNotFoundError(
            f"resume=True but there is no checkpoint file at {path}; check the path, or pass "
            "resume='if-exists' to start afresh when there is none"
        )
    return exists


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically with a checksum (rank 0 only)."""
    if rank() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(_plain(payload), buffer)
    body = buffer.getvalue()
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(body))
    if unsafe:  # refuse now, not when resuming (loading uses weights_only=True)
        raise TypeError(
            f"cannot checkpoint objects of types {unsafe}: a checkpoint holds numbers, "
            "strings, tensors and containers of them (check what on_epoch_end adds to the "
            "history records)"
        )
    digest = hashlib.sha256(body).hexdigest()
    header = MAGIC + f"v{VERSION} sha256={digest} bytes={len(body)}\n".encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays as Python numbers and tensors (e.g. a metric that
    ``on_epoch_end`` stores in the history), so the file loads with weights_only=True.
    Containers are copied only where something changed (state dicts keep their metadata)."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "ndim"):
        return obj.item() if obj.ndim == 0 else torch.from_numpy(obj)
    if isinstance(obj, dict):
        changed = {k: v2 for k, v in obj.items() if (v2 := _plain(v)) is not v}
        if not changed:
            return obj
        out = copy.copy(obj)
        out.update(changed)
        return out
    if type(obj) in (list, tuple):
        items = [_plain(v) for v in obj]
        changed = any(a is not b for a, b in zip(items, obj))
        return type(obj)(items) if changed else obj
    return obj


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(
    path: str | os.PathLike, map_location: torch.device | str = "cpu"
) -> dict[str, Any]:
    """The payload of a checkpoint written by :func:`save_checkpoint`, verified first
    (header, length, checksum), unpickled with ``weights_only=True``. For inspection."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    body = _verified_payload(path, path.read_bytes())
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as err:  # checksum fine, so written by another torch or by hand
        raise CheckpointError(
            path, f"passed its checksum but torch.load cannot read its payload: {err}"
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(path, f"holds a {type(payload).__name__}, not a dict")
    return payload


def load_checkpoint(
    path: str | os.PathLike, device: torch.device, n_epochs: int | None = None
) -> dict[str, Any]:
    """A verified training state to resume from on ``device`` in this process group, for a
    run of ``n_epochs`` (a checkpoint beyond it is refused, not returned as if finished)."""
    path = Path(path)
    payload = read_checkpoint(path, device)
    if "epoch" not in payload:
        raise CheckpointError(path, "does not hold a training state (no 'epoch' entry)")
    if n_epochs is not None and payload["epoch"] > n_epochs:
        raise ValueError(
            f"checkpoint {path} is at epoch {payload['epoch']}, beyond n_epochs={n_epochs}; "
            f"pass n_epochs >= {payload['epoch']} to continue that run"
        )
    ranks = payload.get("rng")
    if isinstance(ranks, list) and len(ranks) != world_size():
        raise CheckpointError(
            path,
            f"was written by {len(ranks)} process(es) but is resumed by {world_size()}: the "
            "per-rank random states and data shards would not match",
        )
    return payload


def _verified_payload(path: Path, data: bytes) -> bytes:
    if not data:
        raise CheckpointError(path, "is empty (0 bytes): the file was truncated or never written")
    if not data.startswith(MAGIC):
        if data.startswith(b"PK\x03\x04"):
            raise CheckpointError(
                path,
                "is a plain torch.save file, not a spamkern checkpoint (no header, no checksum)",
            )
        raise CheckpointError(path, f"is not a spamkern checkpoint (it starts with {data[:16]!r})")
    rest = data[len(MAGIC) :]
    end = rest.find(b"\n", 0, _MAX_HEADER)
    match = _HEADER.fullmatch(rest[: end + 1]) if end >= 0 else None
    if match is None:
        raise CheckpointError(path, "has a damaged header line")
    version, digest, size = int(match[1]), match[2].decode(), int(match[3])
    if version != VERSION:
        raise CheckpointError(
            path, f"has format version {version}; this spamkern reads version {VERSION}"
        )
    body = rest[end + 1 :]
    if len(body) < size:
        raise CheckpointError(
            path, f"is truncated: its header announces {size} payload bytes, it holds {len(body)}"
        )
    if len(body) > size:
        raise CheckpointError(
            path, f"has {len(body) - size} unexpected bytes after its {size}-byte payload"
        )
    actual = hashlib.sha256(body).hexdigest()
    if actual != digest:
        raise CheckpointError(
            path,
            f"is damaged: the sha256 of its payload is {actual[:16]}…, the header records "
            f"{digest[:16]}…",
        )
    return body
