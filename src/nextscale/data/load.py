"""``load_dataset``: a built-in dataset's name or a folder path -> a labelled dataset; ``load_captioned`` -> a
captioned one."""

from __future__ import annotations

from pathlib import Path

from nextscale.data.builtin import fashion_mnist, mnist5k
from nextscale.data.captions import CaptionedImageFolder, FashionPairs, fashion_pairs
from nextscale.data.datasets import ImageFolder, TensorImageDataset, check_channels, check_size, convert_channels
from nextscale.errors import InvalidInputError

BUILTIN = ("fashion-mnist", "mnist5k")


def load_dataset(
    spec: str | Path,
    split: str = "train",
    image_size: int = 32,
    channels: int | None = None,
    root: str | Path | None = None,
    hflip: bool = False,
    seed: int = 0,
) -> TensorImageDataset | ImageFolder:
    """``"fashion-mnist"``, ``"mnist5k"`` or a folder path -> a dataset with ``class_names``/``num_classes``.

    ``split`` is "train" or "test" ("val" is an alias of "test"; mnist5k also takes "all"). A folder whose only
    sub-folders are train/val/test uses the one of that split; any other folder is used whole, with random
    crops for "train" and centre crops otherwise. ``channels=None`` keeps the source's (1 for the built-in
    sets, 3 for folders). ``root`` points at the Fashion-MNIST files.
    """
    if channels is not None:
        check_channels(channels)
    check_size(image_size)
    split = "test" if split == "val" else split
    name = str(spec).strip().lower()
    if name in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        ds = fashion_mnist(split, root=root, size=image_size)
    elif name == "mnist5k":
        ds = mnist5k(size=image_size, split=split)
    else:
        return _folder_split(Path(spec), split, image_size, 3 if channels is None else channels, hflip, seed)
    if channels is not None and channels != ds.channels:
        nhwc = convert_channels(ds.images.permute(0, 2, 3, 1).numpy(), channels)
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


CAPTIONED_BUILTIN = ("fashion-pairs",)


def load_captioned(
    spec: str | Path,
    split: str = "train",
    image_size: int = 64,
    channels: int | None = None,
    root: str | Path | None = None,
    seed: int = 0,
) -> FashionPairs | CaptionedImageFolder:
    """``"fashion-pairs"`` (the built-in captioned set: two Fashion-MNIST items side by side on an
    ``image_size/2`` x ``image_size`` canvas, held-out pairs and phrasings never in "train") or a folder of images
    with a ``metadata.jsonl`` / ``metadata.csv`` (``CaptionedImageFolder``; a folder whose only sub-folders are
    train/val/test uses the one of ``split``). Items are ``(image, caption)``."""
    if channels is not None:
        check_channels(channels)
    check_size(image_size)
    split = "test" if split == "val" else split
    if split not in ("train", "test"):
        raise InvalidInputError(f"split must be 'train' or 'test' (or 'val'), got {split!r}")
    name = str(spec).strip().lower()
    if name in CAPTIONED_BUILTIN:
        return fashion_pairs(split, image_size, seed=seed, channels=channels or 1, root=root, wide=True)
    folder = Path(spec)
    if not folder.is_dir():
        raise InvalidInputError(
            f"dataset {str(spec)!r}: not one of {', '.join(CAPTIONED_BUILTIN)} and not a folder of captioned images"
        )
    subdirs = {d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if subdirs and subdirs <= {"train", "val", "test"} and not any(folder.glob("metadata.*")):
        wanted = ["train"] if split == "train" else ["val", "test"]
        found = [folder / s for s in wanted if (folder / s).is_dir()]
        if not found:
            raise InvalidInputError(f"{folder}: no {' or '.join(wanted)} sub-folder for the {split} split")
        folder = found[0]
    channels = 3 if channels is None else channels
    return CaptionedImageFolder(folder, image_size, channels, train=split == "train", seed=seed)
