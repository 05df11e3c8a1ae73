"""Crash-safe writes: a file or a whole folder appears complete under its final name, or not at all.

A folder write replaces only what its writer made before (a folder with the writer's marker file at its top) or
an empty folder; anything else at the target, a user's folder or file, is refused before any work, and with
``overwrite`` it is moved aside (kept under a ``.old`` name), never deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nextscale.errors import InvalidInputError

log = logging.getLogger("nextscale")

MODEL_INDEX = "model_index.json"
# The files nextscale's folder writers put at a folder's top: model and tokenizer folders (model_index.json),
# classifier folders (config.json). A folder holding one of a writer's markers is that writer's to replace.
NEXTSCALE_MARKERS = (MODEL_INDEX, "config.json")

TargetKind = Literal["new", "empty", "ours", "other"]


@dataclass(frozen=True)
class FolderTarget:
    """What writing a folder at ``path`` (absolute, normalised) finds there."""

    path: Path
    kind: TargetKind  # nothing; an empty folder; an earlier folder of this writer; anything else (overwrite only)


def folder_target(
    path: str | Path,
    markers: tuple[str, ...] = NEXTSCALE_MARKERS,
    overwrite: bool = False,
    force_hint: str = "overwrite=True",
) -> FolderTarget:
    """Check, before any expensive work, that a folder may be written at ``path``; one-line error otherwise.

    Allowed: a new path, an empty folder, or a folder holding one of ``markers``; with ``overwrite`` anything else
    too (it will be moved aside, not deleted). ``force_hint`` names the switch in the message (``--force``)."""
    full = Path(os.path.abspath(path))  # normalises ".", "..", "dir/" lexically
    cwd = Path.cwd()
    if full == cwd or full in cwd.parents:  # "." or "/" have no name to build beside and rename onto
        raise InvalidInputError(
            f"{path}: is {full}, the current folder or one above it, which cannot be replaced by a new folder; "
            f"name a folder to create, e.g. {os.path.join(path, 'model')}"
        )
    check_writable(full.parent, str(path))
    kind = _kind(full, markers)
    if kind == "other" and not overwrite:
        found = _describe(full, markers)
        raise InvalidInputError(f"{path}: {found}; nothing was written. {_way_out(full, force_hint)}")
    return FolderTarget(full, kind)


def atomic_folder(
    path: str | Path,
    fill: Callable[[Path], None],
    markers: tuple[str, ...] = NEXTSCALE_MARKERS,
    overwrite: bool = False,
) -> Path:
    """Build a folder in a temporary sibling with ``fill`` and rename it into place.

    It replaces only what ``folder_target`` allows (checked before ``fill`` and again just before the rename, as
    the target may change while ``fill`` runs); an earlier folder holding one of ``markers`` is replaced, and with
    ``overwrite`` anything else at ``path`` is moved aside to ``<name>.old`` (logged), never deleted."""
    full = folder_target(path, markers, overwrite).path
    full.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{full.name}.", dir=full.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755 & ~_umask())  # mkdtemp creates 0700; a model folder is an ordinary folder
        _commit(tmp, folder_target(path, markers, overwrite))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Path(path)


def check_file_target(path: str | Path, name: str) -> None:
    """One-line error, before the work that produces it, unless a file can be written at ``path``."""
    if Path(path).is_dir():
        raise InvalidInputError(f"{name}: is a folder; expected a file name")
    check_writable(Path(os.path.abspath(path)).parent, name)


def check_writable(folder: Path, name: str) -> None:
    """One-line error, naming ``name`` (the path as the user gave it), unless files can be created in ``folder``
    or, while it does not exist, in the nearest folder above it (where it would be created)."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInputError(f"{name}: cannot be created: {existing} is a file, not a folder")
    try:  # a probe, not os.access: root passes os.access on read-only and virtual file systems (/proc)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:  # the probe's own (random) name is no use to the user: strerror only
        raise InvalidInputError(f"{name}: cannot write in {existing}: {e.strerror or e}") from None


def _kind(full: Path, markers: tuple[str, ...]) -> TargetKind:
    if not os.path.lexists(full):
        return "new"
    if full.is_symlink() or not full.is_dir():
        return "other"
    if any((full / m).is_file() for m in markers):
        return "ours"
    return "other" if any(full.iterdir()) else "empty"


def _describe(full: Path, markers: tuple[str, ...]) -> str:
    if full.is_symlink():
        return "is a symbolic link"
    if not full.is_dir():
        return "is an existing file"
    return f"is a folder with files in it and no {' or '.join(markers)}, so not one nextscale wrote"


def _way_out(full: Path, force_hint: str) -> str:
    return (
        f"Choose a new or empty folder, or pass {force_hint} to move it aside to {full.name}.old (kept, not "
        "deleted) and write there"
    )


def _commit(tmp: Path, target: FolderTarget) -> None:
    full = target.path
    if target.kind in ("new", "empty"):
        os.rename(tmp, full)  # POSIX rename replaces an empty folder atomically and refuses a non-empty one
        return
    if target.kind == "ours":  # the earlier folder goes only once the new one is in place
        aside = Path(tempfile.mkdtemp(prefix=f".{full.name}.old-", dir=full.parent))
    else:
        aside = _free_name(full)
    os.rename(full, aside)
    try:
        os.rename(tmp, full)
    except OSError:
        os.rename(aside, full)  # put the user's folder back rather than leave nothing at its name
        raise
    if target.kind == "ours":
        shutil.rmtree(aside)
    else:
        log.warning("moved what was at %s aside to %s (nothing was deleted)", full, aside)


def _free_name(full: Path) -> Path:
    """``<name>.old``, else ``<name>.old-2``, ``-3``, ...: the first name not in use, beside ``full``."""
    candidate, n = full.with_name(f"{full.name}.old"), 1
    while os.path.lexists(candidate):
        n += 1
        candidate = full.with_name(f"{full.name}.old-{n}")
    return candidate


def atomic_file(path: str | Path, write: Callable[[object], None]) -> Path:
    """Write via ``write(fileobj)`` to a temporary file in the same folder, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
