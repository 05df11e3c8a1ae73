"""LlamaGen's VQ image tokenizer (``tokenizer/tokenizer_image/vq_model.py``: ``VQModel``, e.g. ``vq_ds16_c2i.pt``).

A taming-style conv encoder/decoder around a single-scale vector quantiser: an image [B, 3, H, W] becomes a
``h x w`` map of codebook indices (h = H / downsample), read in raster order as ``L = h*w`` tokens.

Shapes: ``B`` images, ``D`` code dim (codebook_embed_dim, 8 in the release), ``N`` codebook size, ``Cz`` latent
channels before ``quant_conv`` (z_channels), ``h, w`` latent side, ``L = h*w``.

Module and parameter names match the official state dict (``encoder.conv_blocks.0.res.0.conv1``,
``decoder.mid.1.q`` ...), so release files load strictly. Differences from VAR's VQ-VAE (``conv_blocks.py``) that
numerical equality depends on: separate q/k/v 1x1 convs in attention, the swish written as ``x * sigmoid(x)``,
attention at the coarsest level of both encoder and decoder and in both mid blocks, decoder levels stored
coarsest first, and an l2-normalised codebook: latents and codebook rows are normalised on use (the stored rows
are not unit length), and lookups return normalised rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.config import check_ch_mult
from nextscale.errors import ConfigError
from nextscale.models.tokenizers.conv_blocks import Downsample2x, Upsample2x, group_norm

# Size of the official ``codebook_used`` buffer (a training statistic; zeros in eval and unused here).
USAGE_BUFFER_SIZE = 65536


@dataclass(frozen=True)
class VQConfig:
    """The official ``VQModel`` (``VQ_16`` by default). ``ch`` is the Encoder/Decoder default the release uses
    (``VQModel`` passes no ``ch``); ``decoder_ch_mult=None`` means the encoder's."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] | None = None
    z_channels: int = 256
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    dropout: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        dec = self.ch_mult if self.decoder_ch_mult is None else tuple(self.decoder_ch_mult)
        object.__setattr__(self, "decoder_ch_mult", dec)
        if self.codebook_size < 2 or self.codebook_embed_dim < 1 or self.z_channels < 1:
            raise ConfigError(
                f"codebook_size must be >= 2, codebook_embed_dim and z_channels >= 1, got {self.codebook_size}, "
                f"{self.codebook_embed_dim}, {self.z_channels}"
            )
        for name, mult in (("ch_mult", self.ch_mult), ("decoder_ch_mult", dec)):
            check_ch_mult("VQ", self.ch, name, mult, self.norm_groups)
        if len(dec) != len(self.ch_mult):
            raise ConfigError(f"encoder and decoder must have as many levels: {self.ch_mult} vs {dec}")
        if self.num_res_blocks < 1:
            raise ConfigError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def swish(x: torch.Tensor) -> torch.Tensor:
    # Written as the official ``nonlinearity`` (F.silu may round differently).
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate q, k, v 1x1 convs, scale ``C^-1/2``."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        B, C, H, W = x.shape
        q_BNC = self.q(h_).reshape(B, C, H * W).permute(0, 2, 1)
        k_BCN = self.k(h_).reshape(B, C, H * W)
        # Same bmm operands and op order as the official block (query rows, key columns; scale after the product).
        w_BNN = F.softmax(torch.bmm(q_BNC, k_BCN) * (int(C) ** (-0.5)), dim=2)
        h_BCN = torch.bmm(self.v(h_).reshape(B, C, H * W), w_BNN.permute(0, 2, 1))
        return x + self.proj_out(h_BCN.reshape(B, C, H, W))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, their ``attn`` blocks (coarsest level only), and an optional
    resampler registered under the official name (``downsample`` / ``upsample``)."""

    def __init__(self, res: Sequence[nn.Module], attn: Sequence[nn.Module], resampler: tuple[str, nn.Module] | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resampler_name = None if resampler is None else resampler[0]
        if resampler is not None:
            self.add_module(*resampler)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self.resampler_name is not None:
            h = self.get_submodule(self.resampler_name)(h)
        return h


def _mid(channels: int, dropout: float, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, dropout, groups),
            AttnBlock(channels, groups),
            ResnetBlock(channels, channels, dropout, groups),
        ]
    )


class Encoder(nn.Module):
    """image [B, in, H, W] -> latent [B, Cz, H/ds, W/ds]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, groups, n = cfg.ch, cfg.ch_mult, cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i_level in range(n):
            block_in, block_out = ch * in_mult[i_level], ch * mult[i_level]
            res, attn = [], []
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, cfg.dropout, groups))
                block_in = block_out
                if i_level == n - 1:
                    attn.append(AttnBlock(block_in, groups))
            # Downsample: pad right/bottom by 1, then a 3x3 stride-2 conv; none after the coarsest level.
            down = ("downsample", Downsample2x(block_in)) if i_level != n - 1 else None
            self.conv_blocks.append(_Level(res, attn, down))
        self.mid = _mid(block_in, cfg.dropout, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """latent [B, Cz, h, w] -> image [B, out, h*ds, w*ds]; ``conv_blocks[0]`` is the coarsest level."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, groups = cfg.ch, cfg.norm_groups
        mult = cfg.decoder_ch_mult or cfg.ch_mult
        n = len(mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, cfg.dropout, groups)
        self.conv_blocks = nn.ModuleList()
        for i_level in reversed(range(n)):
            block_out = ch * mult[i_level]
            res, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, cfg.dropout, groups))
                block_in = block_out
                if i_level == n - 1:
                    attn.append(AttnBlock(block_in, groups))
            up = ("upsample", Upsample2x(block_in)) if i_level != 0 else None  # nearest x2, then a 3x3 conv
            self.conv_blocks.append(_Level(res, attn, up))
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by squared distance ``|z|² + |e|² - 2 z·e`` (on l2-normalised vectors when enabled)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.D = cfg.codebook_embed_dim
        if cfg.codebook_show_usage:
            # Training statistic of the official quantiser, kept so release files load strictly; never read.
            self.register_buffer("codebook_used", torch.zeros(USAGE_BUFFER_SIZE))
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)

    def codebook(self) -> torch.Tensor:
        """The code vectors as used, [N, D] (unit length with l2 normalisation)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def distances(self, z_MD: torch.Tensor) -> torch.Tensor:
        """Squared distances [M, N] of (normalised) latents to every code, in the official float formula."""
        e_ND = self.codebook()
        if self.l2_norm:
            z_MD = F.normalize(z_MD, p=2, dim=-1)
        return torch.sum(z_MD**2, dim=1, keepdim=True) + torch.sum(e_ND**2, dim=1) - 2 * (z_MD @ e_ND.t())

    def forward(self, z_BDhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent -> (quantised latent [B, D, h, w], indices [B, h, w]).

        The quantised latent is in the official straight-through form ``z + (e - z)`` on normalised ``z`` (equal
        to the code vectors up to rounding), so ``decode(quantised)`` is the official reconstruction."""
        B, _, h, w = z_BDhw.shape
        z_BhwD = z_BDhw.permute(0, 2, 3, 1).contiguous()
        z_MD = z_BhwD.view(-1, self.D)
        idx_M = torch.argmin(self.distances(z_MD), dim=1)
        if self.l2_norm:
            z_BhwD = F.normalize(z_BhwD, p=2, dim=-1)
        zq_BhwD = self.codebook()[idx_M].view(z_BhwD.shape)
        zq_BhwD = z_BhwD + (zq_BhwD - z_BhwD).detach()
        return zq_BhwD.permute(0, 3, 1, 2), idx_M.view(B, h, w)

    def lookup(self, idx_BL: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Indices in raster order [B, h*w] -> code map [B, D, h, w] (``get_codebook_entry``, channel first)."""
        B = idx_BL.shape[0]
        return self.codebook()[idx_BL].reshape(B, h, w, self.D).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def encode_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """The latent before quantisation, [B, D, h, w] (``quant_conv(encoder(x))``)."""
        return self.quant_conv(self.encoder(img_B3HW))

    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> token indices [B, L] in raster (row, column) order."""
        _, idx_Bhw = self.quantize(self.encode_latent(img_B3HW))
        return idx_Bhw.flatten(1)

    def decode_latent(self, quant_BDhw: torch.Tensor) -> torch.Tensor:
        """Code map -> image, unclamped (nominally [-1, 1])."""
        return self.decoder(self.post_quant_conv(quant_BDhw))

    def decode(self, idx_BL: torch.Tensor, h: int | None = None, w: int | None = None) -> torch.Tensor:
        """Token indices [B, L] -> images [B, 3, h*ds, w*ds], unclamped (``decode_code``). A square grid by default."""
        if h is None or w is None:
            side = round(idx_BL.shape[1] ** 0.5)
            if side * side != idx_BL.shape[1]:
                raise ValueError(f"{idx_BL.shape[1]} tokens are no square grid; pass h and w")
            h = w = side
        return self.decode_latent(self.quantize.lookup(idx_BL, h, w))

    def reconstruct(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Encode, quantise and decode (``VQModel.forward(x)[0]``), unclamped."""
        quant, _ = self.quantize(self.encode_latent(img_B3HW))
        return self.decode_latent(quant)
