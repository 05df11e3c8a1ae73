"""The two dataset types: an image folder (one sub-folder per class) read lazily, and uint8 images held in memory.
``CroppedFiles`` is the file-reading half of the image folder, shared with the captioned folder of ``captions.py``.

Both return ``(image [C, H, W] float in [-1, 1], label int)`` and have ``class_names``, ``num_classes`` and
``channels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextscale.data.sampler import seed_of
from nextscale.errors import InvalidInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in this package's [-1, 1] convention (peak-to-peak 2); ``a`` is clamped first. Lives
    with the datasets because both the tokenizer trainers (train) and the quality reports (jobs, via eval) use it,
    and data is the one layer below both."""
    mse = torch.nn.functional.mse_loss(a.float().clamp(-1, 1), b.float()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise InvalidInputError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def check_size(size: int, name: str = "image_size") -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"{name} must be an int >= 1, got {size!r}")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be an int >= 0, got {seed!r}")


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


def list_images(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in files
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class CroppedFiles(torch.utils.data.Dataset):
    """What the folder datasets share: the crop settings, ``set_epoch`` and ``load_image``, which reads one file
    with the transform of the official VAR code: shorter side to ``round(1.125 * image_size)`` (LANCZOS), then a
    random crop (``train=True``) or the centre crop; ``hflip`` adds a random horizontal flip (in either mode).
    Random choices are a function of ``(seed, epoch, index)`` (see ``set_epoch``), identical in any worker process.
    """

    def __init__(self, image_size: int, channels: int, train: bool, hflip: bool, seed: int):
        check_size(image_size)
        check_channels(channels)
        check_seed(seed)
        self.image_size, self.channels = image_size, channels
        self.train, self.hflip, self.seed, self.epoch = train, hflip, seed, 0
        self.mid_size = round(1.125 * image_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops/flips of ``epoch`` (the same image gets a new crop every epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidInputError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def load_image(self, path: Path, index: int) -> torch.Tensor:
        """The file at ``path``, served as item ``index`` -> ``[C, image_size, image_size]`` float in [-1, 1]."""
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
        return arr.float().div_(127.5).sub_(1.0)


class ImageFolder(CroppedFiles):
    """Images under ``root``: one sub-folder per class (index = sorted folder name), searched recursively,
    or, when ``root`` holds images and no sub-folders, a single class named after ``root`` (with class
    sub-folders, images lying directly in ``root`` are ignored, as torchvision's ImageFolder does).

    Images are read with the transform of the official VAR code (see ``CroppedFiles``).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        channels: int = 3,
        train: bool = True,
        hflip: bool = False,
        seed: int = 0,
    ):
        super().__init__(image_size, channels, train, hflip, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidInputError(
                f"{self.root}: no such folder (expected a folder of images, or of class sub-folders of images)"
            )
        self.class_names, self.samples = self._scan()

    def _scan(self) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
        accepted = ", ".join(IMAGE_EXTENSIONS)
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subdirs:
            files = list_images(self.root, recursive=False)
            if not files:
                raise InvalidInputError(f"{self.root}: no images found (accepted extensions: {accepted}, any case)")
            return (self.root.resolve().name or "images",), [(f, 0) for f in files]
        samples: list[tuple[Path, int]] = []
        for label, d in enumerate(subdirs):
            files = list_images(d, recursive=True)
            if not files:
                raise InvalidInputError(
                    f"{self.root}: class folder {d.name!r} has no images (accepted "
                    f"extensions: {accepted}, any case); remove it or add images"
                )
            samples += [(f, label) for f in files]
        return tuple(d.name for d in subdirs), samples

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = range(len(self.samples))[index]  # negative indices allowed; out of range -> IndexError
        path, label = self.samples[index]
        return self.load_image(path, index), label


# ---------------------------------------------------------------------------------------- in-memory datasets


def convert_channels(images_NHWC: np.ndarray, channels: int) -> np.ndarray:
    if images_NHWC.shape[-1] == channels:
        return images_NHWC
    if channels == 3:
        return np.repeat(images_NHWC, 3, axis=-1)
    luma = images_NHWC.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PIL's "L"
    return luma.round().clip(0, 255).astype(np.uint8)[..., None]


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory: uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3) with int labels."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
        class_names: Sequence[str],
    ):
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.dtype != np.uint8:
            raise InvalidInputError(f"images must be uint8, got {arr.dtype}")
        arr = arr[..., None] if arr.ndim == 3 else arr
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise InvalidInputError(
                f"images must be [N, H, W] or [N, H, W, C] with C in (1, 3), got {tuple(np.shape(images))}"
            )
        lab = torch.tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        self.class_names = tuple(str(c) for c in class_names)
        if len(lab) != len(arr):
            raise InvalidInputError(f"{len(arr)} images but {len(lab)} labels")
        if not self.class_names:
            raise InvalidInputError("class_names must name at least one class")
        if len(lab) and not (int(lab.min()) >= 0 and int(lab.max()) < len(self.class_names)):
            raise InvalidInputError(
                f"labels must be in 0..{len(self.class_names) - 1}, got {int(lab.min())}..{int(lab.max())}"
            )
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
