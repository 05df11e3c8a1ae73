"""The one interface a raster (next-token) model's tokenizer presents, to the pipeline and the serving engine alike.

A raster GPT decodes through a ``RasterTokenizer``: the official LlamaGen ``VQModel`` (``LlamaGenVQTokenizer``) or
nextscale's own VQ-VAE with a single scale (``MSVQTokenizer``: a plain VQ-VAE, as the trainer makes them).
``make_tokenizer`` wraps either module after checking it against the GPT.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.models.llamagen import LlamaGenConfig
from nextscale.models.native_raster import check_raster_pair
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.tokenizers.vq import VQModel


class RasterTokenizer(ABC):
    """What a raster model's pipeline and the serving engine need of its tokenizer: token grid <-> code maps <->
    images, in raster (row, column) order.

    ``kind`` is the module's class name as stored in a model folder (``vae/config.json``). Images are float
    [B, C, H, W] in [-1, 1]; code maps float32 [B, D, grid, grid]. The module stays float32 whatever the GPT's
    dtype (``sample_c2i.py`` keeps its VQ in float32 too)."""

    kind: str
    module: nn.Module
    vocab_size: int
    grid: int
    downsample: int
    channels: int

    @property
    def image_size(self) -> int:
        return self.grid * self.downsample

    @abstractmethod
    def embed(self, idx_BL: torch.Tensor) -> torch.Tensor:
        """Tokens [B, grid²] -> code map [B, D, grid, grid] (float32)."""

    @abstractmethod
    def mean_code(self) -> torch.Tensor:
        """The mean code vector [D]: a neutral fill for positions not sampled yet (row previews)."""

    @abstractmethod
    def codebook(self) -> torch.Tensor:
        """The code vectors [V, D] as the quantizer looks them up (latent proximity for LANTERN / GSD)."""

    @abstractmethod
    def decode_codes(self, codes_BDgg: torch.Tensor) -> torch.Tensor:
        """Code map -> images [B, C, H, W], float32, clamped to [-1, 1]."""

    @abstractmethod
    def encode(self, images_BChw: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> tokens [B, grid²] (e.g. to extract training codes)."""

    def decode_tokens(self, idx_BL: torch.Tensor) -> torch.Tensor:
        """Tokens [B, grid²] -> images [B, C, H, W] in [-1, 1]."""
        if idx_BL.ndim != 2 or idx_BL.shape[1] != self.grid**2:
            raise InvalidInputError(
                f"expected tokens [B, {self.grid**2}] ({self.grid}x{self.grid} grid), got {tuple(idx_BL.shape)}"
            )
        return self.decode_codes(self.embed(idx_BL))

    def decode_rows(self, idx_BL: torch.Tensor, rows: int) -> torch.Tensor:
        """A preview of the first ``rows`` rows of the token grid [B, grid²], images [B, C, H, W] in [-1, 1]: every
        later position is filled with the mean code vector (a flat, neutral region)."""
        codes_BDgg = self.embed(idx_BL)
        codes_BDgg[:, :, rows:, :] = self.mean_code().to(codes_BDgg.device)[None, :, None, None]
        return self.decode_codes(codes_BDgg)


class LlamaGenVQTokenizer(RasterTokenizer):
    """The official LlamaGen ``VQModel`` (l2-normalised codebook). It is fully convolutional: the grid comes from
    the GPT it serves."""

    kind = "VQModel"

    def __init__(self, vq: VQModel, grid: int):
        self.vq = self.module = vq
        self.grid, self.vocab_size = grid, vq.cfg.codebook_size
        self.downsample, self.channels = vq.cfg.downsample, vq.cfg.out_channels

    def embed(self, idx_BL: torch.Tensor) -> torch.Tensor:
        return self.vq.quantize.lookup(idx_BL, self.grid, self.grid).float()

    def mean_code(self) -> torch.Tensor:
        return self.vq.quantize.codebook().float().mean(0)

    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.codebook().float()

    def decode_codes(self, codes_BDgg: torch.Tensor) -> torch.Tensor:
        w = self.vq.post_quant_conv.weight
        return self.vq.decode_latent(codes_BDgg.to(w.dtype)).float().clamp_(-1, 1)

    def encode(self, images_BChw: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(images_BChw.to(self.vq.quant_conv.weight.dtype))


class MSVQTokenizer(RasterTokenizer):
    """nextscale's ``VQVAE`` with one scale, ``patch_nums=(grid,)``: a plain VQ-VAE. Its single Phi conv is part of
    the decoder path (code map -> Phi -> decoder), exactly as ``VQVAE.idx_to_img`` with one token map."""

    kind = "VQVAE"

    def __init__(self, vae: VQVAE):
        c = vae.cfg
        if len(c.patch_nums) != 1:
            raise CheckpointError(
                f"a multi-scale VQ-VAE (patch_nums {c.patch_nums}) cannot tokenize for a raster model; it "
                f"needs a single scale, e.g. patch_nums=({c.latent_size},)"
            )
        self.vae = self.module = vae
        self.vocab_size, self.grid, self.downsample, self.channels = (
            c.vocab_size,
            c.latent_size,
            c.downsample,
            c.in_channels,
        )

    def embed(self, idx_BL: torch.Tensor) -> torch.Tensor:
        return self.vae.quantize.embed_map(idx_BL).float()

    def mean_code(self) -> torch.Tensor:
        return self.vae.quantize.embedding.weight.float().mean(0)

    def codebook(self) -> torch.Tensor:
        return self.vae.quantize.embedding.weight.float()

    def decode_codes(self, codes_BDgg: torch.Tensor) -> torch.Tensor:
        return self.vae.fhat_to_img(self.vae.quantize.embed_to_fhat([codes_BDgg])[-1])

    def encode(self, images_BChw: torch.Tensor) -> torch.Tensor:
        return self.vae.img_to_idx(images_BChw.to(self.vae.quant_conv.weight.dtype))[0]


def make_tokenizer(module: nn.Module | RasterTokenizer, gpt_cfg: LlamaGenConfig, source: str = "") -> RasterTokenizer:
    """Wrap a tokenizer module (``VQModel`` or single-scale ``VQVAE``) for a GPT, or check a ready
    ``RasterTokenizer``: codebook size, grid and downsampling must match the GPT (one-line ``CheckpointError``)."""
    if not isinstance(module, RasterTokenizer):
        check_raster_pair(gpt_cfg, module, source)  # VQModel or single-scale VQVAE, else a one-line error
        if isinstance(module, VQModel):
            return LlamaGenVQTokenizer(module, gpt_cfg.grid_size)
        assert isinstance(module, VQVAE)
        return MSVQTokenizer(module)
    have = (module.vocab_size, module.grid, module.downsample)
    want = (gpt_cfg.vocab_size, gpt_cfg.grid_size, gpt_cfg.downsample)
    if have != want:
        raise CheckpointError(
            f"{source + ': ' if source else ''}the tokenizer (codebook, grid, downsample) is {have}, the GPT "
            f"needs {want}"
        )
    return module


__all__ = ["LlamaGenVQTokenizer", "MSVQTokenizer", "RasterTokenizer", "make_tokenizer"]
