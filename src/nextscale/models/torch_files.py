"""Reading a user's torch files safely (``weights_only=True``), every failure one line that says what the file is.

Family-agnostic: each family's official-file reader (``weights.py``, ``llamagen_weights.py``), the training
checkpoints and the pipeline registry read through here.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nextscale.errors import CheckpointError

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# How a legacy (non-zip) torch.save file starts: pickle protocol 2, then the long int 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_SAVE = pickle.PROTO + b"\x02" + pickle.LONG1 + b"\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def load_torch_file(path: Path, pickled_hint: str) -> Any:
    """``safe_torch_load`` a user's file (memory-mapped where the format allows), every failure a one-line
    ``CheckpointError``; ``pickled_hint`` says what to do when it holds pickled objects the safe loader refuses."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        try:
            return safe_torch_load(path, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return safe_torch_load(path)  # legacy (non-zip) format
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if hint := _not_torch_save(path):  # garbage, not a refused pickle
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_what_it_is(path) or hint})") from e
        raise CheckpointError(
            f"{path}: holds pickled Python objects that safe loading (weights_only=True) refuses; {pickled_hint}. "
            f"Detail: {error_detail(e)}"
        ) from e
    except Exception as e:  # the unpickler meets garbage with any error (KeyError 101 for a text file, ...)
        if hint := _not_torch_save(path):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_what_it_is(path) or hint})") from e
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {error_detail(e)}"
        ) from e


def key_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """The sorted distinct integers ``pattern``'s first group matches at the start of ``sd``'s keys (layer counts)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def missing_keys_error(sd: Mapping[str, torch.Tensor], missing: list[str], kind: str, source: str) -> CheckpointError:
    """The error for a state dict that lacks tensors a ``kind`` checkpoint has (after the readers' own hints)."""
    sample = ", ".join(list(sd)[:4])
    return CheckpointError(
        f"{source}: does not look like a {kind} checkpoint: missing {', '.join(missing[:4])} "
        f"(it has {len(sd)} tensors, e.g. {sample})"
    )


def safe_torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file a user handed us.

    An empty file is named as such (torch reports it as a message-less ``EOFError``). The weights-only
    unpickler's warnings (e.g. about a ``pickle.dump`` file's protocol) are silenced here, and only here: the
    one-line error the caller raises says what is wrong, a two-line warning before it only adds noise.
    """
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def error_detail(e: BaseException) -> str:
    """One line of why a load failed: the first sentence of torch's reason when it states one (the rest is
    advice on allow-listing classes), else the message's first non-empty line, else the exception's type
    (messages can be empty, and torch's carry terminal escape codes)."""
    text = _ANSI_ESCAPE.sub("", str(e))
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if found else text).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0].split(". ")[0].rstrip(".") + "." if found else lines[0]


def _not_torch_save(path: Path) -> str | None:
    """Why a file that does not unpickle is no torch.save output at all; None if it looks like one."""
    if zipfile.is_zipfile(path):
        return None
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_TORCH_SAVE))
    if head == _LEGACY_TORCH_SAVE:  # torch.save's legacy format: a protocol-2 pickle of its magic number first
        return None
    if head[:1] == pickle.PROTO:  # a pickle, but not one torch.save wrote
        return "a pickle.dump file, not torch.save output?"
    return "truncated or corrupt?"


def _what_it_is(path: Path) -> str | None:
    """A guess at what a file that is no checkpoint holds, for the error message."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF")):
        return "it is an image"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "it is a text file"
