"""Convolutional encoder and decoder of the VQ-VAE (the LDM/taming "vq-f16" design as VAR uses it).

Module and parameter names match the official checkpoints (``encoder.down.0.block.0.conv1`` ...), so an
official state dict loads strictly. Quirks that numerical equality depends on: GroupNorm eps 1e-6, one fused
1x1 ``qkv`` conv in attention, down-sampling pads only right/bottom before a stride-2 conv.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions with one fused qkv 1x1 conv."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.C = channels
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.w_ratio = channels ** (-0.5)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        C = self.C
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each B, C, HW
        w_BNN = torch.bmm(q.permute(0, 2, 1).contiguous(), k.contiguous()).mul_(self.w_ratio)  # query rows, key cols
        w_BNN = F.softmax(w_BNN, dim=2)
        h_BCN = torch.bmm(v.contiguous(), w_BNN.permute(0, 2, 1).contiguous())  # B, C, HW (query positions)
        return x + self.proj_out(h_BCN.reshape(B, C, H, W))


def _attn_list(channels: int, n: int, enabled: bool, groups: int) -> nn.ModuleList:
    return nn.ModuleList([AttnBlock(channels, groups) for _ in range(n)] if enabled else [])


def _mid_block(channels: int, dropout: float, groups: int, attention: bool) -> nn.Module:
    """The middle of the encoder and of the decoder: ``block_1``, ``attn_1`` (identity without attention),
    ``block_2``."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


class Encoder(nn.Module):
    """image [B, in_ch, H, W] -> features [B, z, H/2^(n-1), W/2^(n-1)] with n = len(ch_mult)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        in_channels: int,
        z_channels: int,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        groups: int = 32,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
            last = i_level == self.num_resolutions - 1
            down.attn = _attn_list(block_in, num_res_blocks, last and using_sa, groups)
            if not last:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = _mid_block(block_in, dropout, groups, using_mid_sa)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latent [B, z, h, w] -> image [B, out_ch, h*2^(n-1), w*2^(n-1)]; ``up[0]`` is the finest level."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        out_channels: int,
        z_channels: int,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        groups: int = 32,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, dropout, groups, using_mid_sa)
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
            last = i_level == self.num_resolutions - 1
            up.attn = _attn_list(block_in, num_res_blocks + 1, last and using_sa, groups)
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The decoder as consecutive pieces (conv_in + mid blocks, then one resnet block, attention or upsample
        at a time); ``forward`` is their composition. A server runs a long decode piece by piece so that work
        for newly arrived requests can run in between (``engine.Engine``)."""
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
            lambda z: self.mid.block_1(self.conv_in(z)),
            self.mid.attn_1,
            self.mid.block_2,
        ]
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                steps.append(block)
                if len(up.attn) > 0:
                    steps.append(up.attn[i_block])
            if i_level != 0:
                steps.append(up.upsample)
        steps.append(lambda h: self.conv_out(F.silu(self.norm_out(h))))
        return steps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for step in self.stages():
            z = step(z)
        return z
