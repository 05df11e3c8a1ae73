"""Training checkpoints that survive being killed at any moment.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers (so it loads with
``weights_only=True``): model, optimizer, grad-scaler and EMA state, the step, every RNG state, and the config
as a dict. The run folder's ``checkpoints/`` keeps the newest one, ``last.pt``, and the one before it,
``prev.pt``, so a ``last.pt`` spoilt after it was written (disk full, a bad copy) still leaves a way back.

Saving moves ``last.pt`` to ``prev.pt`` (``os.replace``: atomic), then writes the new ``last.pt`` to a
temporary file in the same folder, fsyncs it and renames it into place (atomic again). Whenever the process
dies, then, either ``last.pt`` is complete, or it is missing and ``prev.pt`` is complete: there is always a
loadable checkpoint, and resuming takes ``last.pt`` if it exists, else ``prev.pt``. A kill mid-write leaves a
``.last.pt.*`` temporary file, which the next start of the run removes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextscale.errors import CheckpointError
from nextscale.fileio import atomic_file
from nextscale.models.torch_files import error_detail, safe_torch_load
from nextscale.train.config import LoopConfig

log = logging.getLogger("nextscale.train")
LAST = "last.pt"
PREV = "prev.pt"
TEMP_PREFIX = f".{LAST}."  # fileio.atomic_file's temporary files for last.pt


@dataclass(frozen=True)
class Resumed:
    path: Path
    state: dict[str, Any]


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


def save_checkpoint(state: dict[str, Any], folder: Path, newest: Path | None) -> Path:
    """Write ``folder/last.pt``; ``newest`` is where this run's newest checkpoint so far is (None: nowhere)."""
    last, prev = folder / LAST, folder / PREV
    newest = newest.resolve() if newest is not None else None
    if newest == last.resolve():
        os.replace(last, prev)
    elif newest != prev.resolve():  # a fresh run: checkpoints left here by another run must never be resumed
        last.unlink(missing_ok=True)
        prev.unlink(missing_ok=True)
    return save_atomic(state, last)


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temporary files of checkpoint writes that a killed run left in ``folder``; returns how many."""
    stale = list(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def open_resume(cfg: LoopConfig, folder: Path) -> Resumed | None:
    """The checkpoint a run continues from: ``resume_from``, else (``resume``) last.pt or prev.pt in ``folder``."""
    if cfg.resume_from:
        return Resumed(Path(cfg.resume_from), load_training_state(cfg.resume_from))
    if not cfg.resume:
        return None
    resumed = newest_checkpoint(folder)
    if resumed is None:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", folder)
    return resumed


def newest_checkpoint(folder: Path) -> Resumed | None:
    """last.pt in ``folder``, else prev.pt (killed between moving last.pt aside and writing the new one), else
    None; a bad last.pt is an error that names prev.pt when there is one."""
    last, prev = folder / LAST, folder / PREV
    if last.is_file():
        try:
            return Resumed(last, load_training_state(last))
        except CheckpointError as e:
            if not prev.is_file():
                raise
            raise CheckpointError(f"{e}; the checkpoint before it can be resumed with --resume-from {prev}") from e
    if prev.is_file():
        return Resumed(prev, load_training_state(prev))
    return None


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training checkpoint to resume from")
    try:
        state = safe_torch_load(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({error_detail(e)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a nextscale training checkpoint (holds a {type(state).__name__})")
    for key in ("step", "model", "optimizer", "rng", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: not a nextscale training checkpoint (no {key!r})")
    return state
