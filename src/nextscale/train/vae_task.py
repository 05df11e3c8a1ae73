"""Tokenizer training: the multi-scale residual VQ-VAE from scratch (the official repo ships no such code).

Loss: ``MSE + l1_weight * L1`` on the reconstruction plus ``vq_weight *`` the VQ loss (codebook + beta *
commitment, averaged over scales, straight-through estimator). Dead codes — codes no scale picked during
the last ``dead_code_every`` steps — are re-seeded from latent residual vectors of the current batch, so the
codebook stays in use (reported per scale at every evaluation, with reconstruction PSNR).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from nextscale.config import VQVAEConfig
from nextscale.data import ShardedBatchSampler, load_dataset, psnr
from nextscale.errors import ConfigError
from nextscale.models.native_var import load_tokenizer, save_tokenizer
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.train import dist
from nextscale.train.config import VAETrainConfig

log = logging.getLogger("nextscale.train")


# Settings that do not shape the weights a run starts from: the loss's beta, dropout, and the scales (a tokenizer
# may be trained on to other scales; its shared quant_resi convolutions are the same).
_NOT_SHAPE = ("beta", "dropout", "patch_nums")


def _pretrained(path: str, want: VQVAEConfig) -> VQVAE:
    """The tokenizer at ``path``, refused unless its shape is ``want``'s (naming each difference)."""
    vae = load_tokenizer(path, want.patch_nums)
    have = vae.cfg
    diff = [
        f"{f.name} {getattr(have, f.name)!r} (this run: {getattr(want, f.name)!r})"
        for f in dataclasses.fields(want)
        if f.name not in _NOT_SHAPE and getattr(have, f.name) != getattr(want, f.name)
    ]
    if diff:
        raise ConfigError(f"init_from {path}: a tokenizer of another shape: {', '.join(diff)}")
    return vae


class VAETask:
    def __init__(self, cfg: VAETrainConfig, info: dist.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        vae_cfg = cfg.vqvae_config()
        with torch.device("meta"):  # its shape is refused before the data is read (no memory, no time)
            VQVAE(vae_cfg)
        pretrained = _pretrained(cfg.init_from, vae_cfg) if cfg.init_from is not None else None
        self.train_ds = load_dataset(cfg.data, "train", cfg.image_size, cfg.in_channels, root=cfg.data_root)
        self.val_ds = load_dataset(cfg.data, "test", cfg.image_size, cfg.in_channels, root=cfg.data_root)
        torch.manual_seed(cfg.seed)
        self.model = VQVAE(vae_cfg).train()
        nn.init.uniform_(self.model.quantize.embedding.weight, -1 / cfg.vocab_size, 1 / cfg.vocab_size)
        if pretrained is not None:
            self.model.load_state_dict(pretrained.state_dict(), strict=True)
            log.info("initialised from %s", cfg.init_from)
        self.generators = {
            "data": torch.Generator().manual_seed(cfg.seed + 17),
            "codes": torch.Generator().manual_seed(cfg.seed + 29),
        }
        per_rank = cfg.batch_size // info.world_size
        self.sampler = ShardedBatchSampler(len(self.train_ds), per_rank, cfg.seed, info.rank, info.world_size)
        self.images_per_step = cfg.batch_size
        self.last_used = torch.zeros(cfg.vocab_size, dtype=torch.long)
        self._residuals: torch.Tensor | None = None

    def batches(self, start_step: int) -> Iterator[torch.Tensor]:
        for _step, epoch, idx in self.sampler.batches(start_step):
            if hasattr(self.train_ds, "set_epoch"):  # image folders draw a new random crop every epoch
                self.train_ds.set_epoch(epoch)
            imgs = torch.stack([self.train_ds[int(i)][0] for i in idx])
            if self.cfg.hflip:
                flip = torch.rand(len(idx), generator=self.generators["data"]) < 0.5
                imgs = torch.where(flip.view(-1, 1, 1, 1), imgs.flip(-1), imgs)
            yield imgs.to(self.device)

    def loss(
        self, model: nn.Module, batch: torch.Tensor, step: int, micro: int, num_micro: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        imgs = batch.chunk(num_micro)[micro]
        recon, vq_loss, idx_list, f = model(imgs)
        mse = F.mse_loss(recon.float(), imgs)
        l1 = F.l1_loss(recon.float(), imgs)
        loss = mse + self.cfg.l1_weight * l1 + self.cfg.vq_weight * vq_loss
        used = torch.cat([i.reshape(-1) for i in idx_list]).unique().cpu()
        self.last_used[used] = step + 1
        if self.cfg.dead_code_every:  # candidates for re-seeding dead codes
            self._residuals = f.float().permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu()
        return loss / num_micro, {"loss": loss.item(), "mse": mse.item(), "vq": vq_loss.item()}

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        every = self.cfg.dead_code_every
        if not every or (step + 1) % every or self._residuals is None:
            return {}
        used = self.last_used.clone()
        if self.info.enabled:
            tdist.all_reduce(used, op=tdist.ReduceOp.MAX)
        dead = (used <= step + 1 - every).nonzero().view(-1)
        if len(dead):
            pick = torch.randint(len(self._residuals), (len(dead),), generator=self.generators["codes"])
            rows = self._residuals[pick] + 1e-3 * torch.randn(
                len(dead), self._residuals.shape[1], generator=self.generators["codes"]
            )
            weight = self.model.quantize.embedding.weight
            new = weight.detach().clone()
            new[dead.to(weight.device)] = rows.to(weight.device, weight.dtype)
            if self.info.enabled:  # every rank must hold the same codebook: rank 0's choice wins
                tdist.broadcast(new, src=0)
            weight.copy_(new)
            self.last_used[dead] = step + 1
        return {"codes_reseeded": float(len(dead))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_images: int = 1024) -> dict[str, float]:
        vae = dist.unwrap(model)
        assert isinstance(vae, VQVAE)
        n = min(max_images, len(self.val_ds))
        imgs = torch.stack([self.val_ds[i][0] for i in range(n)]).to(self.device)
        out: dict[str, float] = {}
        recons, counts = [], [torch.zeros(vae.cfg.vocab_size) for _ in vae.cfg.patch_nums]
        for chunk in imgs.split(256):
            idx_list, fhats = vae.quantize.quantize(vae.encode(chunk))
            recons.append(torch.stack([vae.fhat_to_img(f) for f in fhats]))
            for si, idx in enumerate(idx_list):
                counts[si] += torch.bincount(idx.reshape(-1).cpu(), minlength=vae.cfg.vocab_size).float()
        recon = torch.cat(recons, dim=1)  # [S, n, C, H, W]
        out["psnr"] = psnr(recon[-1], imgs)
        for si in range(len(vae.cfg.patch_nums)):
            out[f"psnr_s{si}"] = psnr(recon[si], imgs)
            out[f"usage_s{si}"] = float((counts[si] > 0).float().mean())
        out["usage"] = float((sum(counts) > 0).float().mean())
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"last_used": self.last_used}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "last_used" in state:
            self.last_used.copy_(state["last_used"])

    def export(self, out_dir: Path, model: nn.Module) -> Path:
        vae = dist.unwrap(model).eval()
        extra = {"trained_on": self.cfg.data, "class_names": list(self.train_ds.class_names)}
        return save_tokenizer(out_dir / self.cfg.export_name, vae, extra)
