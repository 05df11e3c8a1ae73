"""Zero-shot editing masks (VAR paper Sec. 4.6): which tokens of the input image are kept at every scale.

A keep-map at latent resolution is bilinearly resized to each scale's pn x pn grid and thresholded at 0.5;
maps of at most 3 tokens are kept entirely (the official notebook's rule: the coarsest scale carries the
global colour of the input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def keep_maps(keep_hw: torch.Tensor, patch_nums: Sequence[int], batch: int) -> list[torch.Tensor]:
    """``keep_hw`` [h, w] in [0, 1] (1 = keep the input's token) -> one bool [batch, pn*pn] per scale."""
    side = patch_nums[-1]
    m = keep_hw.float()[None, None]
    if m.shape[-1] != side:
        m = F.interpolate(m, size=(side, side), mode="area")  # pixel mask -> fraction kept per latent cell
    out = []
    for pn in patch_nums:
        k = F.interpolate(m, size=(pn, pn), mode="bilinear", align_corners=False).gt(0.5)
        if pn * pn <= 3:
            k.fill_(True)
        out.append(k.view(1, pn * pn).expand(batch, -1).clone())
    return out


def box_mask(size: int, y0: float, x0: float, y1: float, x1: float) -> torch.Tensor:
    """A [size, size] mask that is 1 inside the box given in fractions of the side (0..1), else 0."""
    m = torch.zeros(size, size)
    m[round(y0 * size) : round(y1 * size), round(x0 * size) : round(x1 * size)] = 1
    return m
