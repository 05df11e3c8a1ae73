"""Tokenizers: images <-> discrete tokens. ``msvq.py`` is VAR's multi-scale VQ-VAE, ``vq.py`` LlamaGen's VQ model,
``raster.py`` the one interface a raster (next-token) model decodes through, whichever of the two it uses.

Every decoder here returns images in [-1, 1]; ``to_unit_range_`` is the one place that turns them into the [0, 1]
images users get (the pipelines, the serving engine and its previews all call it).
"""

from __future__ import annotations

import torch


def to_unit_range_(img_BChw: torch.Tensor) -> torch.Tensor:
    """The decoder's [-1, 1] output -> [0, 1], in place."""
    return img_BChw.add_(1).mul_(0.5)
