"""Multi-scale residual VQ-VAE (VAR paper, Sec. 3.2 and Alg. 1/2): image <-> per-scale token maps.

Shapes: ``B`` batch, ``Cv`` code dim (z_channels), ``h, w`` latent side (= ``patch_nums[-1]``), ``pn`` side of
a scale's token map, ``l = pn*pn``, ``V`` codebook size, ``S`` number of scales.

An image's latent ``f`` [B, Cv, h, w] is quantised coarse to fine: at scale ``si`` the residual is
area-downsampled to pn x pn, each position takes its nearest code, the code map is bicubic-upsampled back to
h x w, passed through a Phi conv (``0.5*h + 0.5*conv(h)``) and added to the running reconstruction ``f_hat``.
All of it runs in float32 whatever the surrounding dtype: nearest-code search is the most precision-sensitive
step of the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.config import VQVAEConfig
from nextscale.models.scales import phi_index_table
from nextscale.models.tokenizers import to_unit_range_
from nextscale.models.tokenizers.conv_blocks import Decoder, Encoder


class Phi(nn.Conv2d):
    """The residual refiner applied to each upsampled code map: ``(1-r)*h + r*conv3x3(h)``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _phi_or_identity(channels: int, ratio: float) -> nn.Module:
    return Phi(channels, ratio) if abs(ratio) > 1e-6 else nn.Identity()


class PhiPartiallyShared(nn.Module):
    """K convs shared by neighbouring scales (release: K=4); keys ``quant_resi.qresi_ls.{k}``."""

    def __init__(self, channels: int, ratio: float, K: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([_phi_or_identity(channels, ratio) for _ in range(K)])

    def select(self, k: int) -> nn.Module:
        return self.qresi_ls[k]


class PhiShared(nn.Module):
    """One conv for every scale; key ``quant_resi.qresi``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        self.qresi = _phi_or_identity(channels, ratio)

    def select(self, k: int) -> nn.Module:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    """One conv per scale (or ``default_qresi_counts``); keys ``quant_resi.{k}``."""

    def __init__(self, channels: int, ratio: float, K: int):
        super().__init__([_phi_or_identity(channels, ratio) for _ in range(K)])

    def select(self, k: int) -> nn.Module:
        return self[k]


class MultiScaleQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2``: codebook, Phi convs and the residual loop over scales."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums = cfg.patch_nums
        S, K = len(cfg.patch_nums), cfg.share_quant_resi
        if K == 0:
            n = cfg.default_qresi_counts or S
            self.quant_resi: nn.Module = PhiNonShared(self.Cvae, cfg.quant_resi, n)
            self.phi_table = phi_index_table(S, n)
        elif K == 1:
            self.quant_resi = PhiShared(self.Cvae, cfg.quant_resi)
            self.phi_table = (0,) * S
        else:
            self.quant_resi = PhiPartiallyShared(self.Cvae, cfg.quant_resi, K)
            self.phi_table = phi_index_table(S, K)
        # Usage statistics (training only); kept as a buffer because official checkpoints carry it.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(S, self.vocab_size))
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)

    # ---- geometry helpers -------------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def side(self) -> int:
        return self.patch_nums[-1]

    def phi(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        return self.quant_resi.select(self.phi_table[si])(h_BChw)

    def upsample(self, h_BChw: torch.Tensor) -> torch.Tensor:
        """Bicubic to the latent side (no-op at full size), as ``F.interpolate(mode='bicubic')``."""
        if h_BChw.shape[-1] == self.side:
            return h_BChw
        return F.interpolate(h_BChw, size=(self.side, self.side), mode="bicubic")

    @staticmethod
    def downsample(f_BChw: torch.Tensor, pn: int) -> torch.Tensor:
        """Area (adaptive-average) downsampling to pn x pn; no-op at full size."""
        if f_BChw.shape[-1] == pn:
            return f_BChw
        return F.interpolate(f_BChw, size=(pn, pn), mode="area")

    def embed_map(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Token map [B, pn*pn] -> code map [B, Cv, pn, pn]."""
        B, l = idx_Bl.shape
        pn = round(l**0.5)
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    # ---- nearest code ---------------------------------------------------------------------------------
    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code per row, in the official float32 formula ``|z|^2 + |e|^2 - 2 z.e``."""
        E_VC = self.embedding.weight.detach().float()
        z_NC = z_NC.float()
        if self.cfg.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(E_VC.T, dim=0), dim=1)
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    # ---- encode: latent -> tokens ------------------------------------------------------------------------
    @torch.no_grad()
    def quantize(self, f_BChw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Residual quantisation of ``f``: per-scale token maps [B, l] and the running ``f_hat`` after each."""
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        B, C = f_rest.shape[:2]
        idx_list, fhat_list = [], []
        for si, pn in enumerate(self.patch_nums):
            z_NC = self.downsample(f_rest, pn).permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bl = self.nearest(z_NC).view(B, pn * pn)
            h_BChw = self.phi(si, self.upsample(self.embed_map(idx_Bl)).contiguous())
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            idx_list.append(idx_Bl)
            fhat_list.append(f_hat.clone())
        return idx_list, fhat_list

    # ---- decode: tokens -> latent ------------------------------------------------------------------------
    def embed_to_fhat(self, ms_h_BChw: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Partial sums of ``f_hat`` after each scale from per-scale code maps [B, Cv, pn, pn]."""
        B = ms_h_BChw[0].shape[0]
        f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, self.side, self.side, dtype=torch.float32)
        out = []
        for si, h_BChw in enumerate(ms_h_BChw):
            f_hat.add_(self.phi(si, self.upsample(h_BChw.float())))
            out.append(f_hat.clone())
        return out

    def embed_to_fhat_progressive(self, ms_h_BChw: Sequence[torch.Tensor]) -> torch.Tensor:
        """The official "experimental only" variant: upsample the running f_hat to each scale instead."""
        B = ms_h_BChw[0].shape[0]
        pn0 = self.patch_nums[0]
        f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
        for si, pn in enumerate(self.patch_nums):
            f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
            f_hat.add_(self.phi(si, ms_h_BChw[si].float()))
        return f_hat

    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.embed_to_fhat([self.embed_map(idx) for idx in idx_list])[-1]

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the transformer, ``x_BLCv_wo_first_l`` [B, L - first_l, Cv].

        Token t of scale k+1 sees the area-downsampled reconstruction from scales 0..k.
        """
        B = idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.Cvae, self.side, self.side, device=idx_list[0].device)
        chunks = []
        for si in range(self.num_scales - 1):
            f_hat.add_(self.phi(si, self.upsample(self.embed_map(idx_list[si]))))
            pn_next = self.patch_nums[si + 1]
            chunks.append(self.downsample(f_hat, pn_next).view(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(chunks, dim=1)

    def next_input(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """Sampling update: add scale ``si``'s code map to ``f_hat`` IN PLACE; return the next scale's input.

        The return value is ``f_hat`` area-downsampled to the next scale's side ([B, Cv, pn', pn']), or
        ``f_hat`` itself after the last scale.
        """
        f_hat_BChw.add_(self.phi(si, self.upsample(h_BChw.float())))
        if si == self.num_scales - 1:
            return f_hat_BChw
        nxt_BChw = self.downsample(f_hat_BChw, self.patch_nums[si + 1])
        # At full size that is f_hat itself, which keeps changing in place: hand out a copy.
        return nxt_BChw.clone() if nxt_BChw is f_hat_BChw else nxt_BChw

    # ---- training forward (straight-through) ------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Quantise with a straight-through estimator for VQ-VAE training.

        Returns ``(f_hat_st, vq_loss, idx_list)``: the reconstruction whose gradient flows to ``f`` unchanged,
        the mean over scales of ``beta*|sg(f_hat) - f|^2 + |f_hat - sg(f)|^2``, and the chosen tokens.
        Single-process: usage statistics are the caller's business (no collective calls in here).
        """
        f = f_BChw.float()
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        B, C = f.shape[:2]
        loss = f.new_zeros(())
        idx_list = []
        with torch.autocast(device_type=f.device.type, enabled=False):
            for si, pn in enumerate(self.patch_nums):
                z_NC = self.downsample(f_rest, pn).permute(0, 2, 3, 1).reshape(-1, C)
                idx_Bl = self.nearest(z_NC).view(B, pn * pn)
                h_BChw = self.phi(si, self.upsample(self.embed_map(idx_Bl)).contiguous())
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                loss = loss + F.mse_loss(f_hat.detach(), f).mul(self.cfg.beta) + F.mse_loss(f_hat, f_no_grad)
                idx_list.append(idx_Bl)
        f_hat_st = (f_hat.detach() - f_no_grad) + f
        return f_hat_st, loss / self.num_scales, idx_list


class VQVAE(nn.Module):
    """Encoder + quant_conv -> multi-scale quantiser -> post_quant_conv + decoder. Images live in [-1, 1]."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        conv_kw = dict(
            ch=cfg.ch,
            ch_mult=cfg.ch_mult,
            num_res_blocks=cfg.num_res_blocks,
            z_channels=cfg.z_channels,
            dropout=cfg.dropout,
            using_sa=cfg.using_sa,
            using_mid_sa=cfg.using_mid_sa,
            groups=cfg.norm_groups,
        )
        self.encoder = Encoder(in_channels=cfg.in_channels, **conv_kw)
        self.decoder = Decoder(out_channels=cfg.in_channels, **conv_kw)
        self.quantize = MultiScaleQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, stride=1, padding=ks // 2)

    def encode(self, img_BChw: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent ``f`` [B, Cv, h, w] before quantisation."""
        return self.quant_conv(self.encoder(img_BChw))

    @torch.no_grad()
    def img_to_idx(self, img_BChw: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.quantize(self.encode(img_BChw))[0]

    def decode_unclamped(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat_BChw))

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent -> image clamped to [-1, 1]; runs in the decoder's dtype and memory format."""
        *_, img = self.fhat_to_img_steps(f_hat_BChw)
        return img

    def decode_images(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent -> images [B, C, H, W] in [0, 1], float32 (what users get; ``fhat_to_img`` is in [-1, 1])."""
        return to_unit_range_(self.fhat_to_img(f_hat_BChw))

    def fhat_to_img_steps(self, f_hat_BChw: torch.Tensor) -> Iterator[torch.Tensor]:
        """``fhat_to_img`` one decoder piece per ``next()`` (intermediate activations are yielded); the last
        value is the image. A resumable decode: the serving engine interleaves it with transformer work."""
        w = self.post_quant_conv.weight
        h = f_hat_BChw.to(dtype=w.dtype)
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.post_quant_conv(h)
        for step in self.decoder.stages():
            h = step(h)
            yield h
        yield h.float().clamp_(-1, 1)

    @torch.no_grad()
    def idx_to_img(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    @torch.no_grad()
    def img_to_recon(self, img_BChw: torch.Tensor) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.quantize(self.encode(img_BChw))[1][-1])

    def forward(self, img_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Training pass: (unclamped reconstruction, vq loss, tokens, latent ``f`` before quantisation)."""
        f = self.encode(img_BChw)
        f_hat, vq_loss, idx_list = self.quantize(f)
        return self.decode_unclamped(f_hat), vq_loss, idx_list, f.detach()
