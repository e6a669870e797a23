"""Checkpoints of a marginal-likelihood run: everything needed to continue it exactly.

Saved: model, optimisers, scheduler, prior, log σ, epoch, history, masks and every random
state the run draws from (torch's global CPU/CUDA state, the batch-shuffling and MC
generators). Written atomically (temp file + rename) by rank 0 only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from spamkern.distributed import rank


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


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (rank 0 only under torch.distributed)."""
    if rank() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device: torch.device) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    return torch.load(path, map_location=device, weights_only=False)
