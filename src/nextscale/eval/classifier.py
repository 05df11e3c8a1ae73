"""A small CNN classifier: the feature network for FID/precision/recall/accuracy on small grey datasets.

The Inception network of FID knows ImageNet photos, not 32x32 clothes or digits; a classifier trained on the
dataset itself gives features that separate its classes (the usual practice for MNIST-like FID). It trains in
a few CPU minutes, deterministically given a seed, and is stored as ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nextscale.errors import CheckpointError, ConfigError, InvalidInputError
from nextscale.eval.metrics import ArrayLike, float_nchw, uint8_nhwc_to_float01
from nextscale.fileio import atomic_folder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FEATURE_DIM = 256
WIDTHS = (24, 48, 96)  # conv widths: ~0.45M parameters, ~1.5 ms per training image on one CPU core


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {self.in_channels!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ConfigError(f"image_size must be an int >= 8, got {self.image_size!r}")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
    )


class SmallClassifier(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (24, 48, 96 channels), 4x4 pooling, FC 256 (the features), FC out.

    Implements ``FeatureNet``: ``features``/``logits`` take uint8 NHWC images (or float NCHW in [-1, 1]) at
    ``image_size``; grey/RGB inputs are converted to ``in_channels`` (channel mean / repetition).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.config = ClassifierConfig(in_channels, num_classes, image_size)
        c1, c2, c3 = WIDTHS
        self.body = nn.Sequential(
            _block(in_channels, c1),
            _block(c1, c2),
            _block(c2, c3),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(c3 * 16, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x_NCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float [N, in_channels, S, S] in [-1, 1] -> (features [N, 256], logits [N, num_classes])."""
        feats = self.body(x_NCHW)
        return feats, self.head(feats)

    def prepare(self, images: ArrayLike) -> torch.Tensor:
        """uint8 NHWC or float NCHW in [-1, 1] -> float NCHW in [-1, 1] with ``in_channels`` channels."""
        if isinstance(images, np.ndarray) or images.dtype == torch.uint8:
            x = uint8_nhwc_to_float01(images).mul_(2).sub_(1)
        else:
            x = float_nchw(images, "[-1, 1]")
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            raise InvalidInputError(f"this classifier takes {s}x{s} images, got {tuple(x.shape[-2:])}")
        if x.shape[1] != self.config.in_channels:
            x = x.mean(1, keepdim=True) if self.config.in_channels == 1 else x.expand(-1, 3, -1, -1)
        return x

    def features_and_logits(self, images: ArrayLike, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        was_training, device = self.training, next(self.parameters()).device
        self.eval()
        feats, logits = [], []
        try:
            with torch.inference_mode():
                for lo in range(0, len(images), batch_size):
                    f, g = self(self.prepare(images[lo : lo + batch_size]).to(device))
                    feats.append(f.float().cpu())
                    logits.append(g.float().cpu())
        finally:
            self.train(was_training)
        if not feats:
            raise InvalidInputError("no images given")
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: ArrayLike, batch_size: int = 256) -> torch.Tensor:
        return self.features_and_logits(images, batch_size)[0]

    def logits(self, images: ArrayLike, batch_size: int = 256) -> torch.Tensor:
        return self.features_and_logits(images, batch_size)[1]


# ---------------------------------------------------------------------------------------------- training


def _dataset_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset of (float [C, H, W] in [-1, 1], label) -> (images float NCHW in [-1, 1], labels int64).

    In-memory datasets (``.images`` uint8 NCHW and ``.labels``) are used as they are; others are read once.
    """
    if isinstance(getattr(ds, "images", None), torch.Tensor) and isinstance(getattr(ds, "labels", None), torch.Tensor):
        return ds.images.float().div(127.5).sub(1.0), ds.labels.long()
    if len(ds) == 0:
        raise InvalidInputError("the dataset is empty")
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]).float(), torch.tensor([y for _, y in items], dtype=torch.int64)


def random_shift(x_NCHW: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y (edge pixels repeated): pad + random crop."""
    if max_shift <= 0:
        return x_NCHW
    n, _, h, w = x_NCHW.shape
    padded = F.pad(x_NCHW, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [N, 1, 1, W]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x_NCHW.shape[1])[None, :, None, None], rows, cols]


def evaluate_accuracy(
    model: SmallClassifier, images_NCHW: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    logits = model.logits(images_NCHW, batch_size)
    return float((logits.argmax(1) == labels).double().mean())


def train_classifier(
    train_ds: Any,
    test_ds: Any,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    max_shift: int = 2,
    weight_decay: float = 0.05,
) -> tuple[SmallClassifier, float]:
    """Train a ``SmallClassifier`` on ``train_ds``; returns it (eval mode) and its accuracy on ``test_ds``.

    AdamW with a one-epoch-fraction warm-up and cosine decay, random shifts of up to ``max_shift`` pixels.
    Deterministic given ``seed`` (initialisation, shuffling and augmentation use their own generators; the
    global RNG is left untouched).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidInputError(f"epochs must be an int >= 1, got {epochs!r}")
    if batch_size < 1 or not lr > 0:
        raise InvalidInputError(f"batch_size must be >= 1 and lr > 0, got {batch_size} and {lr}")
    x, y = _dataset_tensors(train_ds)
    x_test, y_test = _dataset_tensors(test_ds)
    num_classes = int(getattr(train_ds, "num_classes", int(y.max()) + 1))
    if x.shape[-1] != x.shape[-2]:
        raise InvalidInputError(f"images must be square, got {tuple(x.shape[-2:])}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(x.shape[1], num_classes, x.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(x) // batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, steps_per_epoch // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    )
    bar = _progress(total, progress)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            _, logits = model(random_shift(x[idx], max_shift, gen))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return model, evaluate_accuracy(model, x_test, y_test)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="classifier", unit="step")


# ------------------------------------------------------------------------------------------------ storage


def save_classifier(model: SmallClassifier, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` to ``folder`` (replaced atomically if it exists).

    ``metadata`` (JSON-serialisable: dataset, accuracy, ...) is kept in config.json under "metadata".
    """

    def fill(tmp: Path) -> None:
        cfg = {"_class_name": "SmallClassifier", **asdict(model.config), "metadata": metadata or {}}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})

    return atomic_folder(folder, fill)


def load_classifier(folder: str | Path) -> SmallClassifier:
    """Load a folder written by ``save_classifier`` strictly, in eval mode."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{cfg_path}: missing (not a classifier folder written by save_classifier?)") from e
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "SmallClassifier":
        raise CheckpointError(f"{cfg_path}: not a SmallClassifier config")
    try:
        model = SmallClassifier(cfg["in_channels"], cfg["num_classes"], cfg["image_size"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{cfg_path}: invalid classifier config: {e}") from e
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path}: missing or not a readable safetensors file: {e}") from e
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(state)) or [k for k in expected if expected[k].shape != state[k].shape]
    if problems:
        raise CheckpointError(
            f"{w_path}: does not match the config (missing, unexpected or mis-shaped tensors: "
            f"{', '.join(problems[:5])})"
        )
    model.load_state_dict(state)
    return model.eval()
