"""Infinity's bitwise tokenizer: a FLUX-style conv autoencoder with multi-scale binary spherical quantization
(BSQ, Zhao et al. 2024), weight-compatible with the official ``infinity_vae_d*.pth`` files.

Shapes: ``B`` batch, ``d`` bits per latent pixel (= latent channels), ``H, W`` the full latent grid, ``h, w`` a
scale's grid. Latent code maps are 5-D ``[B, d, 1, h, w]`` as in the official code (a time axis of 1): the
trilinear/area resampling of the official loop runs on them, so results match element for element.

A latent pixel's bits quantise the l2-normalised feature to ``±1/sqrt(d)`` per channel; codes from bits are
``l2norm(bits*2s - s)`` with ``s = 1/sqrt(d)``. Coarse to fine, each scale quantises the (area-downsampled)
residual and the running sum of trilinear-upsampled codes is the decoder's input.

Numerics follow ``bsq_vae/flux_vqgan.py`` and ``multiscale_bsq.py`` op by op (``x*sigmoid(x)`` for swish,
``z + (zhat - z)`` for the quantised value, the same permuted memory layouts), not a cleaned-up equivalent: the
bits are sign tests and the decoder's conv algorithm follows its input's memory format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.config import check_int
from nextscale.errors import ConfigError

Grid = tuple[int, int]
PATCH_SIZES = (4, 8, 16)  # pixels per latent pixel side; the releases use 16 and 8


@dataclass(frozen=True)
class BSQVAEConfig:
    """The official ``vae_model(...)``: base_ch 128, 2 res blocks, no attention, GroupNorm; ``bits`` = codebook_dim.

    ``patch_size`` 16 (ch_mult [1,2,4,4,4]) or 8 (ch_mult [1,2,4,4], the 8B's tokenizer whose 2x2 latent pixels
    make one transformer token: spatial patchify). ``spatial_patchify`` None means as released: on for patch 8 only.
    Patch 4 (two down-samplings, no patchify: a token is 4x4 pixels) is nextscale's, for small images such as
    the bundled text-to-image demo's 32x64 canvases."""

    bits: int = 32
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16
    in_channels: int = 3
    spatial_patchify: bool | None = None  # the official apply_spatial_patchify

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        check_int("bits", self.bits, 1, 64)
        check_int("base_ch", self.base_ch)
        check_int("num_res_blocks", self.num_res_blocks)
        check_int("in_channels", self.in_channels)
        if self.patch_size not in PATCH_SIZES:
            raise ConfigError(f"patch_size must be one of {', '.join(map(str, PATCH_SIZES))}, got {self.patch_size!r}")
        if self.spatial_patchify is not None and not isinstance(self.spatial_patchify, bool):
            raise ConfigError(
                f"spatial_patchify must be true, false or null (as released), got {self.spatial_patchify!r}"
            )
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ConfigError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if len(self.ch_mult) < self.num_downsamples + 1:
            raise ConfigError(
                f"patch_size {self.patch_size} needs at least {self.num_downsamples + 1} ch_mult levels, "
                f"got {self.ch_mult}"
            )
        for width in {self.base_ch * m for m in self.ch_mult}:
            norm_groups(width)

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.patch_size))

    @property
    def patchify(self) -> bool:
        """Whether a transformer token is 2x2 latent pixels (``apply_spatial_patchify=1``: the f8 release)."""
        return self.patch_size == 8 if self.spatial_patchify is None else self.spatial_patchify

    @property
    def token_bits(self) -> int:
        """Bits per transformer token (``d_vae`` of the transformer)."""
        return self.bits * 4 if self.patchify else self.bits

    @property
    def token_stride(self) -> int:
        """Pixels per transformer token side: 16 for both released tokenizers (f16; f8 with 2x2 patchify)."""
        return self.patch_size * (2 if self.patchify else 1)


def norm_groups(channels: int) -> int:
    """GroupNorm groups of ``Normalize`` (flux_vqgan.py:25-31): 32, else 24, else unsupported."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ConfigError(f"every tokenizer width must be a multiple of 32 or 24 (GroupNorm groups), got {channels}")


def swish(x: torch.Tensor) -> torch.Tensor:
    # Not F.silu: the official x*sigmoid(x) rounds differently, and encoder outputs feed sign tests.
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    """The official ``Conv`` wrapper (keys ``*.conv.weight``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    """The official ``Normalize`` wrapper (keys ``*.norm.weight``): GroupNorm, eps 1e-6."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = Normalize(cin)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (no asymmetric padding in torch convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), then ``downsample``/``upsample`` where the patch size asks."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name
        if resample is not None:
            setattr(self, name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        resample = getattr(self, self.resample_name, None)
        return h if resample is None else resample(h)


class _Mid(nn.Module):
    """The middle: two res blocks (no attention block: ``cnn_attention='no'``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(h))


class Encoder(nn.Module):
    """image [B, 3, H*p, W*p] -> features [B, d, H, W]; levels i < log2(p) downsample (flux_vqgan.py:184-270)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        self.conv_in = Conv(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1, *mult)
        levels = []
        block_in = ch
        for i in range(len(mult)):
            block_in, block_out = ch * in_mult[i], ch * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down = Downsample(block_in) if i < cfg.num_downsamples else None
            levels.append(_Level(blocks, down, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, cfg.bits, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """latent [B, d, H, W] -> image; ``up[0]`` is the finest level, levels 1..log2(p) upsample
    (flux_vqgan.py:273-387)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = Conv(cfg.bits, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        ups: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            up = Upsample(block_in) if 1 <= i <= cfg.num_downsamples else None
            ups.insert(0, _Level(blocks, up, "upsample"))
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(swish(self.norm_out(h)))


# ---- binary spherical quantization -------------------------------------------------------------------------------
def bsq_quantize(z_Bd1hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``BSQ.forward`` with ``new_quant``: (quantised codes [B, d, 1, h, w], bits [B, 1, h, w, d] int32).

    The quantised value is ``z + (zhat - z)`` (straight-through form, equal to ``zhat`` up to rounding), with
    ``zhat = ±1/sqrt(d)`` on the l2-normalised z; it is returned as the same permuted view as the official one."""
    B, d, t, h, w = z_Bd1hw.shape
    # einops pack_one(rearrange(z, 'b d ... -> b ... d'), 'b * d') concatenates: always a fresh contiguous [B, n, d]
    x = z_Bd1hw.permute(0, 2, 3, 4, 1).reshape(B, t * h * w, d).contiguous().unsqueeze(2)  # c = 1 codebook
    x = F.normalize(x, dim=-1).float()
    one = torch.tensor(1, dtype=x.dtype, device=x.device)
    zhat = (1.0 / d**0.5) * torch.where(x > 0, one, -one)
    quantized = x + (zhat - x)
    bits = (quantized > 0).int().reshape(B, t, h, w, d)
    return quantized.reshape(B, t, h, w, d).permute(0, 4, 1, 2, 3), bits


def bits_to_codes(bits_B1hwd: torch.Tensor) -> torch.Tensor:
    """``BSQ.indices_to_codes(bits, 'bit_label')``: bits [B, 1, h, w, d] -> codes [B, d, 1, h, w]."""
    d = bits_B1hwd.shape[-1]
    s = float(1 / math.sqrt(d))  # codebook_scale
    codes = F.normalize(bits_B1hwd.unsqueeze(-2) * s * 2 - s, dim=-1)
    return codes.flatten(-2).permute(0, 4, 1, 2, 3)


def unpatchify_bits(bits_Bhwd: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Transformer bits [B, h, w, d_t] -> tokenizer bits [B, 1, h', w', d] (2x2 pixel shuffle with patchify)."""
    if patchify:
        bits_Bhwd = F.pixel_shuffle(bits_Bhwd.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    return bits_Bhwd.unsqueeze(1)


def upsample_codes(codes_Bd1hw: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Trilinear resampling of a code map to ``grid`` (the official ``z_interplote_up``)."""
    return F.interpolate(codes_Bd1hw, size=(1, *grid), mode="trilinear")


def latent_to_tokens(latent_Bd1HW: torch.Tensor, grid: Grid, patchify: bool) -> torch.Tensor:
    """The next scale's transformer input from the running code sum: trilinear to ``grid`` (the latent grid of
    that scale; post-bugfix d542c51, formerly area), 2x2 pixel-unshuffle with patchify -> [B, l, d_t]."""
    x = upsample_codes(latent_Bd1HW, grid).squeeze(-3)
    if patchify:
        x = F.pixel_unshuffle(x, 2)
    return x.reshape(*x.shape[:2], -1).permute(0, 2, 1)


def quantize_st(h_BdHW: torch.Tensor, grids: Sequence[Grid]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-scale BSQ with gradients, for training (``BSQVAE.forward``): (decoder input [B, d, H, W], commitment
    loss, entropy loss). The same scales as ``BSQVAE.quantize``; see ``train.bsq_task`` for the losses."""
    d = h_BdHW.shape[1]
    full = grids[-1]
    residual = h_BdHW.unsqueeze(2)  # [B, d, 1, H, W]: the official 5-D layout, so resampling matches inference
    out: torch.Tensor | float = 0.0
    commit = entropy = h_BdHW.new_zeros(())
    for grid in grids:
        z = residual if grid == full else F.interpolate(residual, size=(1, *grid), mode="area")
        u = F.normalize(z, dim=1)
        q = torch.where(u > 0, 1.0, -1.0) / d**0.5
        commit = commit + (u - q.detach()).pow(2).sum(1).mean()
        p = torch.sigmoid(2 * d**0.5 * u)  # soft bit: ~0.88 at the code's own value
        per_pixel = _bit_entropy(p).mean()
        batch = _bit_entropy(p.mean(dim=(0, 2, 3, 4))).mean()
        entropy = entropy + per_pixel - batch
        q_st = u + (q - u).detach()
        if grid != full:
            q_st = upsample_codes(q_st, full)
        residual = residual - q_st
        out = out + q_st
    assert isinstance(out, torch.Tensor)
    n = len(grids)
    return out.squeeze(2), commit / n, entropy / n


def _bit_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class BSQVAE(nn.Module):
    """Encoder -> multi-scale BSQ -> decoder. Images are [B, 3, H, W] in [-1, 1] (RGB, as trained)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.bits = cfg.bits
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, img_BChw: torch.Tensor, grids: Sequence[Grid]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: (reconstruction, commitment loss, entropy loss) through ``quantize_st`` over ``grids``."""
        z, commit, entropy = quantize_st(self.encoder(img_BChw).float(), grids)
        return self.decoder(z), commit, entropy

    def encode_features(self, img_BChw: torch.Tensor) -> torch.Tensor:
        """Continuous latent [B, d, H, W] float32 (``encode_for_raw_features``)."""
        return self.encoder(img_BChw).to(dtype=torch.float32)

    def decode(self, z_BdHW: torch.Tensor) -> torch.Tensor:
        """Latent codes -> image clamped to [-1, 1]."""
        return torch.clamp(self.decoder(z_BdHW), min=-1, max=1)

    @torch.no_grad()
    def quantize(self, h_BdHW: torch.Tensor, grids: Sequence[Grid]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``MultiScaleBSQ.forward`` over the latent ``grids`` (the last one the full grid): the quantised latent
        [B, d, H, W] and the bits of each scale [B, 1, h, w, d] (area-downsampled full-resolution residuals)."""
        full = (1, *h_BdHW.shape[-2:])
        x = h_BdHW.unsqueeze(2).permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3).contiguous()
        residual: torch.Tensor = x
        out: torch.Tensor | float = 0.0
        bits_list = []
        for grid in grids:
            size = (1, *grid)
            z = residual if size == full else F.interpolate(residual, size=size, mode="area")
            q, bits = bsq_quantize(z)
            q = q * 1.0  # out_fact
            if size != full:
                q = F.interpolate(q, size=full, mode="trilinear").contiguous()
            residual = residual - q
            out = out + q
            bits_list.append(bits)
        assert isinstance(out, torch.Tensor)
        out = out.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3).contiguous()
        return out.squeeze(2), bits_list

    @torch.no_grad()
    def bsc_inputs(
        self,
        h_BdHW: torch.Tensor,
        grids: Sequence[Grid],
        patchify: bool,
        flips: Sequence[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forcing data as ``BitwiseSelfCorrection.flip_requant``: the transformer input of scales 1..
        ``x_BLd_wo_prefix`` [B, L - 1, d_t] and the target bits of every scale [B, l, d_t].

        ``flips[si]`` (training; None: no flips, the exact tokens): a bool mask of scale si's bits [B, 1, h, w, d]
        to flip before they join the running sum, as a sampler's mistakes would; later scales quantise the residual
        left by the flipped sum, so their targets are the bits that correct the mistakes (Bitwise Self-Correction,
        Infinity section 3.3). Each scale's target is its bits before the flips."""
        codes = h_BdHW.unsqueeze(2)
        B, last = codes.shape[0], len(grids) - 1
        cum: torch.Tensor | int = 0
        bits_list, inputs = [], []
        for si, grid in enumerate(grids):
            residual = codes - cum
            if si != last:
                residual = F.interpolate(residual, size=(1, *grid), mode="area").contiguous()
            q, bits = bsq_quantize(residual)
            bits_list.append(bits)
            flip = None if flips is None else flips[si]
            if flip is not None:
                q = bits_to_codes(torch.where(flip.to(bits.device), 1 - bits, bits).float())
            cum = cum + upsample_codes(q, grids[-1]).contiguous()
            if si < last:
                assert isinstance(cum, torch.Tensor)
                nxt = upsample_codes(cum, grids[si + 1]).contiguous()
                if patchify:
                    nxt = F.pixel_unshuffle(nxt.squeeze(-3), 2)
                inputs.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
        if patchify:
            d4 = 4 * self.bits
            gt = [
                F.pixel_unshuffle(b.squeeze(1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(B, -1, d4)
                for b in bits_list
            ]
        else:
            gt = [b.reshape(B, -1, self.bits) for b in bits_list]
        return torch.cat(inputs, 1), gt
