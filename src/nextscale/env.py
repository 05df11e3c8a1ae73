"""The one place nextscale reads environment variables: typed accessors, read when called (never at import)."""

from __future__ import annotations

import os
from pathlib import Path

FASHION_MNIST_ROOT = "NEXTSCALE_FASHION_MNIST_ROOT"
ALLOCATOR_REEXEC = "NEXTSCALE_ALLOCATOR_REEXEC"  # set on the command re-executed under tcmalloc
CACHE = "NEXTSCALE_CACHE"


def fashion_mnist_root() -> Path | None:
    """Folder with Fashion-MNIST's four IDX ``.gz`` files, from ``$NEXTSCALE_FASHION_MNIST_ROOT`` (None if unset)."""
    value = os.environ.get(FASHION_MNIST_ROOT, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """The cache every run shares (e.g. training tokens): ``$NEXTSCALE_CACHE``, else ``$XDG_CACHE_HOME/nextscale``,
    else ``~/.cache/nextscale``. Nothing in it is needed: deleting it only costs recomputation."""
    value = os.environ.get(CACHE, "").strip()
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative path is invalid and is ignored
        return Path(xdg) / "nextscale"
    return Path.home() / ".cache" / "nextscale"


def distributed() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun with more than one process, else None."""
    if "RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def allocator_reexeced() -> bool:
    """True in a command that ``allocator.use_tcmalloc`` already re-executed (so it never loops)."""
    return os.environ.get(ALLOCATOR_REEXEC) == "1"


def ld_preload() -> str:
    """The dynamic loader's preload list (``$LD_PRELOAD``), empty if unset."""
    return os.environ.get("LD_PRELOAD", "").strip()
