"""Conversions between PIL images, numpy arrays and model tensors, and image grids (PIL only, no torchvision).

Model tensors are float [B, C, H, W]; the VQ-VAE works in [-1, 1], outputs are returned in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextscale.errors import InvalidInputError

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | Path


def to_uint8_nhwc(images_BChw: torch.Tensor) -> np.ndarray:
    """[0, 1] float -> uint8 NHWC with round-half-up, as the ADM/VAR sample scripts do."""
    x = images_BChw.detach().float().clamp(0, 1).mul(255).add_(0.5).clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images_BChw: torch.Tensor) -> list[Image.Image]:
    arr = to_uint8_nhwc(images_BChw)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a, mode="RGB") for a in arr]


def auto_grid_cols(n: int) -> int:
    """About square; up to four images in one row."""
    return min(n, math.ceil(math.sqrt(n)) if n > 4 else n)


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    if not images:
        raise InvalidInputError("cannot make a grid of zero images")
    n = len(images)
    ncols = ncols or auto_grid_cols(n)
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    grid = Image.new(
        images[0].mode,
        (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad),
        255 if images[0].mode == "L" else (255, 255, 255),
    )
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def load_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.copy()
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"{image}: cannot read image: {e}") from e
    if isinstance(image, Image.Image):
        return image
    raise InvalidInputError(f"expected a PIL image or a path, got {type(image).__name__}")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (LANCZOS), then centre crop, as VAR's evaluation transform."""
    w, h = im.size
    s = size / min(w, h)
    if (w, h) != (size, size):
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def image_to_tensor(image: ImageInput, size: int, channels: int) -> torch.Tensor:
    """Any supported image -> [1, channels, size, size] float in [-1, 1].

    Arrays/tensors are taken as already sized: HWC/CHW uint8 in [0, 255] or float in [0, 1].
    """
    if isinstance(image, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image)
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
            t = t.permute(2, 0, 1)
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise InvalidInputError(f"image array must be HW, HWC or CHW with 1 or 3 channels, got {tuple(t.shape)}")
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        if t.shape[-2:] != (size, size):
            raise InvalidInputError(f"image array must be {size}x{size}, got {tuple(t.shape[-2:])}")
        if t.shape[0] != channels:
            t = t.mean(0, keepdim=True) if channels == 1 else t.expand(3, -1, -1)
        return t.unsqueeze(0).mul(2).sub(1)
    im = resize_center_crop(load_pil(image).convert("L" if channels == 1 else "RGB"), size)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.unsqueeze(0).mul(2).sub(1)


def mask_to_tensor(mask: ImageInput, size: int) -> torch.Tensor:
    """A mask (PIL/array/tensor, any size; >0.5 or white = 1) -> [size, size] float in {0, 1}."""
    if isinstance(mask, (str, Path, Image.Image)):
        im = load_pil(mask).convert("L").resize((size, size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    else:
        t = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).float()
        if t.ndim == 3 and 1 in (t.shape[0], t.shape[-1]):
            t = t.squeeze(0) if t.shape[0] == 1 else t.squeeze(-1)
        if t.ndim != 2:
            raise InvalidInputError(f"mask must be 2-D (H, W), got shape {tuple(t.shape)}")
        if t.max() > 1:
            t = t / 255.0
        if t.shape != (size, size):
            t = torch.nn.functional.interpolate(t[None, None], size=(size, size), mode="bilinear", align_corners=False)[
                0, 0
            ]
    return (t > 0.5).float()
