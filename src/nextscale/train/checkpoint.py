"""Training checkpoints that survive being killed at any moment.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers (so it loads with
``weights_only=True``): model, optimizer, grad-scaler and EMA state, the step, every RNG state, and the config
as a dict. It is written to a temporary file in the same folder, flushed to disk and renamed over the old
one, so a crash leaves either the previous or the new checkpoint, never a torn file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nextscale.errors import CheckpointError
from nextscale.fileio import atomic_file

LAST = "last.pt"


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state.update({f"gen_{k}": g.get_state() for k, g in generators.items()})
    return state


def restore_rng(state: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for k, g in generators.items():
        g.set_state(state[f"gen_{k}"])


def save_atomic(obj: Any, path: str | Path) -> Path:
    return atomic_file(path, lambda f: torch.save(obj, f))


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({str(e).splitlines()[0]})") from e
    for key in ("step", "model", "optimizer", "rng", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: not a nextscale training checkpoint (no {key!r})")
    return state
