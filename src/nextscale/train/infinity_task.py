"""Text-to-image training of an Infinity transformer: ``nextscale train --arch infinity``.

Infinity's objective (Han et al. 2024, section 3): the bitwise tokenizer's bits of every scale are the labels, one
binary cross-entropy per bit (logits ``[B, L, 2d]`` read as d pairs, as the sampler reads them), averaged over every
bit of every token. Inputs are Bitwise Self-Correction's (``BSQVAE.bsc_inputs`` with flips): each step draws a
flip rate per scale from {0, 0.01, .., bsc_strength} (the official ``noise_apply_strength`` draw), so the model
sees running sums with mistakes and learns the bits that correct them. ``cond_drop`` of the captions (drawn for the
global batch: the same run on 1 or N processes) are replaced by the learned null text ``cfg_uncond[:len]``, which
is what classifier-free guidance samples the unconditional branch with, so it learns from exactly those rows.

Images are encoded per batch by the frozen tokenizer (BSC needs the continuous latent, which a token cache would
have to hold in full; the encoder is a few percent of a step), the captions once, by the frozen text encoder, into
the cache all runs share (``train.text_cache``).

The export is a native Infinity folder (``InfinityPipeline.from_pretrained``): the transformer, the tokenizer, and
the text encoder stored beside them, with the schedule trained on as the model's default size and pixel budget.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.data import ShardedBatchSampler, load_captioned
from nextscale.errors import CheckpointError
from nextscale.models.infinity import Infinity, InfinityConfig
from nextscale.models.infinity_scales import InfinitySchedule, image_schedule
from nextscale.models.infinity_weights import load_official_infinity
from nextscale.models.native_infinity import load_bsq_tokenizer, load_infinity_native, save_infinity_native
from nextscale.models.text_encoder import TextEncoder, TextFeatures
from nextscale.train import dist
from nextscale.train.config import InfinityTrainConfig
from nextscale.train.text_cache import cached_caption_features

log = logging.getLogger("nextscale.train")


def size_text(sched: InfinitySchedule) -> str:
    """'WIDTHxHEIGHT' of a schedule's images (the pipeline's ``size``)."""
    h, w = sched.image_size
    return f"{w}x{h}"


def bit_ce(logits_BLV: torch.Tensor, bits_BLd: torch.Tensor) -> torch.Tensor:
    """Per-bit cross-entropy [B, L, d] of logits read as (bit 0, bit 1) pairs."""
    B, L, d = bits_BLd.shape
    ce = F.cross_entropy(logits_BLV.float().reshape(B * L * d, 2), bits_BLd.reshape(-1).long(), reduction="none")
    return ce.view(B, L, d)


class InfinityTask:
    def __init__(self, cfg: InfinityTrainConfig, info: dist.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.vae = load_bsq_tokenizer(cfg.tokenizer).to(device).eval().requires_grad_(False)
        self.text_encoder = TextEncoder.from_pretrained(cfg.text_encoder)
        inf_cfg = cfg.infinity_config(self.vae.cfg.token_bits, self.text_encoder.channels)
        with torch.device("meta"):  # the transformer's shape is refused before the data is read
            Infinity(inf_cfg)
        channels = self.vae.cfg.in_channels
        stride = self.vae.cfg.token_stride
        self.train_ds = load_captioned(cfg.data, "train", cfg.image_size, channels, cfg.data_root, cfg.seed)
        self.val_ds = load_captioned(cfg.data, "test", cfg.image_size, channels, cfg.data_root, cfg.seed)
        _, height, width = self.train_ds[0][0].shape
        self.schedule = image_schedule(height, width, cfg.pn, stride)
        self.vae_grids = list(self.schedule.vae_grids(self.vae.cfg.patchify))
        torch.manual_seed(cfg.seed)
        pretrained = self._pretrained(cfg.init_from, inf_cfg) if cfg.init_from else None
        if pretrained is not None:  # fine-tuning: the architecture is the pretrained one's
            inf_cfg = dataclasses.replace(pretrained.cfg, drop_path_rate=cfg.drop_path_rate)
        self.model = Infinity(inf_cfg)
        self.model.init_weights()
        if pretrained is not None:
            self.model.load_state_dict({k: v.float() for k, v in pretrained.state_dict().items()}, strict=True)
            log.info("initialised from %s", cfg.init_from)
        self.model.train()
        self.generators = {
            "data": torch.Generator().manual_seed(cfg.seed + 101),
            "flips": torch.Generator().manual_seed(cfg.seed + 131),
        }
        per_rank = cfg.batch_size // info.world_size
        self.sampler = ShardedBatchSampler(len(self.train_ds), per_rank, cfg.seed, info.rank, info.world_size)
        self.images_per_step = cfg.batch_size
        # Last: the one slow step (encoding the distinct captions; then cached).
        train_caps, val_caps = self.train_ds.captions, self.val_ds.captions
        self.text = cached_caption_features(self.text_encoder, train_caps + val_caps, info)
        self.train_ids = torch.tensor([self.text.index[c] for c in train_caps])
        self.val_ids = torch.tensor([self.text.index[c] for c in val_caps])

    @staticmethod
    def _pretrained(source: str, want: InfinityConfig) -> Infinity:
        """The transformer of an Infinity model folder or an official file, refused (naming both values) unless
        it reads this run's tokens and text features."""
        p = Path(source)
        pre = load_infinity_native(p)[0] if (p / "model_index.json").is_file() else load_official_infinity(p)
        for name, what in (("bits", "token bits (the tokenizer's)"), ("text_channels", "text width (the encoder's)")):
            have, need = getattr(pre.cfg, name), getattr(want, name)
            if have != need:
                raise CheckpointError(f"init_from {source}: cannot fine-tune from it here: {what} {have} != {need}")
        return pre

    # ---- data ------------------------------------------------------------------------------------------------
    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """(images [B, C, H, W], caption ids [B], dropped [B] bool, bit flips [B, bits of all scales] bool) of this
        rank for every step from ``start_step``. Drops and flips are drawn for the global batch, each rank takes its
        slice: a run is the same on 1 or N processes and with any gradient accumulation."""
        world, rank = self.info.world_size, self.info.rank
        for _step, epoch, idx in self.sampler.batches(start_step):
            if hasattr(self.train_ds, "set_epoch"):
                self.train_ds.set_epoch(epoch)
            drop = torch.rand(len(idx) * world, generator=self.generators["data"]) < self.cfg.cond_drop
            flips = self.flip_masks(len(idx) * world).view(world, len(idx), -1)[rank]
            imgs = torch.stack([self.train_ds[int(i)][0] for i in idx])
            yield imgs.to(self.device), self.train_ids[idx], drop.view(world, -1)[rank], flips

    def text_rows(self, model: Infinity, ids: torch.Tensor, drop: torch.Tensor) -> TextFeatures:
        """The batch's text features; a dropped caption becomes the learned null text of its length (trained)."""
        rows = self.text.rows(ids.tolist())
        out = [model.cfg_uncond[: len(r)] if d else r.to(self.device) for r, d in zip(rows, drop.tolist())]
        return TextFeatures(torch.cat(out), tuple(len(r) for r in rows))

    def flip_masks(self, n: int) -> torch.Tensor:
        """Which bits of ``n`` images Bitwise Self-Correction flips, [n, bits of all scales] (scale by scale, each
        [h, w, d] flattened): each scale at one rate from {0, 0.01, .., bsc_strength} for the whole batch (the
        official ``np.random.randint(0, 100*s + 1) * 0.01``)."""
        gen, d = self.generators["flips"], self.vae.bits
        top = round(100 * self.cfg.bsc_strength)
        rates = torch.randint(0, top + 1, (len(self.vae_grids),), generator=gen).float() * 0.01
        return torch.cat([torch.rand(n, h * w * d, generator=gen) < r for (h, w), r in zip(self.vae_grids, rates)], 1)

    def inputs(self, imgs: torch.Tensor, flips_BN: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing input [B, L-1, d] and target bits [B, L, d] of ``imgs``, with the bit flips ``flips_BN``
        (``flip_masks``; None: the exact tokens)."""
        masks = None
        if flips_BN is not None:
            B, d = len(imgs), self.vae.bits
            sizes = [h * w * d for h, w in self.vae_grids]
            masks = [m.view(B, 1, h, w, d) for m, (h, w) in zip(flips_BN.split(sizes, 1), self.vae_grids)]
        with torch.no_grad():
            h = self.vae.encode_features(imgs)
            x, gt = self.vae.bsc_inputs(h, self.vae_grids, self.vae.cfg.patchify, masks)
        return x, torch.cat(gt, 1)

    # ---- loss --------------------------------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], step: int, micro: int, n: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        imgs, ids, drop, flips = (t.chunk(n)[micro] for t in batch)
        inf = dist.unwrap(model)
        assert isinstance(inf, Infinity)
        x_in, gt_BLd = self.inputs(imgs, flips)
        logits = model(self.text_rows(inf, ids, drop), x_in, self.schedule, pad_to=1)
        ce_BLd = bit_ce(logits, gt_BLd)
        # The null text is used outside the module's forward (it replaces dropped captions); a zero term keeps it in
        # every step's graph, so DDP, which expects a gradient for every parameter, also gets one on a step that
        # dropped no caption.
        loss = ce_BLd.mean() + 0.0 * inf.cfg_uncond[0, 0]
        with torch.no_grad():
            B, L, d = gt_BLd.shape
            acc = (logits.reshape(B, L, d, 2).argmax(-1) == gt_BLd).float().mean().item()
        return loss / n, {"loss": loss.item(), "bit_acc": acc}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    # ---- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_images: int = 512) -> dict[str, float]:
        """Validation bit cross-entropy and accuracy (exact inputs, no flips) per scale, and the loss with the null
        text: ``text_gain`` (nats per bit) is what the caption is worth, the signal guidance amplifies."""
        inf = dist.unwrap(model)
        assert isinstance(inf, Infinity)
        n = min(max_images, len(self.val_ds))
        S = self.schedule.num_scales
        ce_s, hit_s, ce_null = torch.zeros(S), torch.zeros(S), 0.0
        for start in range(0, n, 128):
            idx = range(start, min(start + 128, n))
            imgs = torch.stack([self.val_ds[i][0] for i in idx]).to(self.device)
            ids = self.val_ids[list(idx)]
            x_in, gt = self.inputs(imgs, None)
            for null in (False, True):
                drop = torch.full((len(idx),), null)
                logits = inf(self.text_rows(inf, ids, drop), x_in, self.schedule, pad_to=1)
                ce = bit_ce(logits, gt)
                if null:
                    ce_null += float(ce.mean(dim=(1, 2)).sum())
                    continue
                B, L, d = gt.shape
                hit = (logits.reshape(B, L, d, 2).argmax(-1) == gt).float()
                for si, (b, e) in enumerate(self.schedule.begin_ends):
                    ce_s[si] += float(ce[:, b:e].mean(dim=(1, 2)).sum())
                    hit_s[si] += float(hit[:, b:e].mean(dim=(1, 2)).sum())
        w = torch.tensor(self.schedule.lengths, dtype=torch.float)
        loss = float((ce_s * w).sum() / w.sum() / n)
        out = {"loss": loss, "bit_acc": float((hit_s * w).sum() / w.sum() / n), "text_gain": ce_null / n - loss}
        out.update({f"bit_acc_s{si}": float(hit_s[si] / n) for si in range(S)})
        return out

    # ---- state, export -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def export(self, out_dir: Path, model: nn.Module) -> Path:
        """A native Infinity folder at ``out_dir/model``: this run's schedule is the model's default size."""
        inf = dist.unwrap(model)
        assert isinstance(inf, Infinity)
        extra: dict[str, Any] = {
            "trained_on": self.cfg.data,
            "sampling_defaults": {"pn": self.cfg.pn, "size": size_text(self.schedule)},
        }
        return save_infinity_native(out_dir / self.cfg.export_name, inf.eval(), self.vae, self.text_encoder, extra)
