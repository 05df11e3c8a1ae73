"""Training Infinity's bitwise tokenizer (``BSQVAE``) from scratch: ``nextscale train-vae --arch bsq``.

The official tokenizer training code is not released (Infinity issues #80, #93 point to the BitVAE repo); this
follows the BSQ paper (Zhao et al. 2024, "Image and Video Tokenization with Binary Spherical Quantization") on the
multi-scale residual quantizer ``BSQVAE.quantize`` samples with:

* each scale quantises the area-downsampled residual: ``u = l2norm(z)``, ``q = sign(u)/sqrt(d)``, passed to the
  decoder with the straight-through estimator ``u + sg(q - u)``; the residual drops the trilinear-upsampled ``q``
  and the decoder reads the sum over scales, exactly as ``BSQVAE.quantize`` / ``bsc_inputs`` compute it at
  inference (so the transformer later trains on the very codes this loss shaped);
* loss: ``MSE + l1_weight * L1`` of the reconstruction, ``beta *`` the commitment ``|u - sg(q)|²`` (mean over the
  scales), and ``entropy_weight *`` BSQ's entropy term on soft bits ``p = sigmoid(2 sqrt(d) u)``: the mean
  per-pixel bit entropy (pushes each bit to be decided) minus the entropy of the batch-mean bit (pushes every bit
  to be used both ways). With independent bits the codebook entropy of the paper factorises into the per-bit one.

No perceptual or adversarial loss (the paper's, for natural images at 128-256 px): on 32 x 64 grey canvases the
pixel losses already reconstruct what the classifier reads. Evaluation: PSNR of the reconstruction from every
prefix of the scales, and how balanced each bit is (``bit_balance``: the mean over bits of min(p, 1-p) / 0.5).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.data import ShardedBatchSampler, load_captioned, load_dataset, psnr
from nextscale.data.captions import METADATA_FILES
from nextscale.data.load import CAPTIONED_BUILTIN
from nextscale.errors import ConfigError
from nextscale.models.infinity_scales import image_schedule
from nextscale.models.native_infinity import save_bsq_tokenizer
from nextscale.models.tokenizers.bsq import BSQVAE, Grid, bits_to_codes, upsample_codes
from nextscale.train import dist
from nextscale.train.config import BSQTrainConfig

log = logging.getLogger("nextscale.train")


def images_dataset(cfg: BSQTrainConfig, split: str) -> Any:
    """The images of ``cfg.data`` (their captions or labels are not used): a captioned set (``fashion-pairs``, a
    folder with a metadata file) or a labelled one (``fashion-mnist``, ``mnist5k``, a class-folder tree)."""
    folder = Path(cfg.data)
    captioned = str(cfg.data).strip().lower() in CAPTIONED_BUILTIN
    captioned = captioned or (folder.is_dir() and any((folder / f).is_file() for f in METADATA_FILES))
    if captioned:
        return load_captioned(cfg.data, split, cfg.image_size, cfg.in_channels, root=cfg.data_root, seed=cfg.seed)
    return load_dataset(cfg.data, split, cfg.image_size, cfg.in_channels, root=cfg.data_root, seed=cfg.seed)


class BSQTask:
    def __init__(self, cfg: BSQTrainConfig, info: dist.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        vae_cfg = cfg.bsq_config()
        with torch.device("meta"):  # its shape is refused before the data is read
            BSQVAE(vae_cfg)
        self.train_ds = images_dataset(cfg, "train")
        self.val_ds = images_dataset(cfg, "test")
        _, height, width = self.train_ds[0][0].shape
        stride = vae_cfg.token_stride
        if height % stride or width % stride:
            raise ConfigError(f"images of {height}x{width} px do not divide into {stride} px tokens")
        sched = image_schedule(height, width, cfg.pn, stride)
        self.schedule = sched
        self.grids = list(sched.vae_grids(vae_cfg.patchify))
        torch.manual_seed(cfg.seed)
        self.model = BSQVAE(vae_cfg).train()
        self.generators = {"data": torch.Generator().manual_seed(cfg.seed + 17)}
        per_rank = cfg.batch_size // info.world_size
        self.sampler = ShardedBatchSampler(len(self.train_ds), per_rank, cfg.seed, info.rank, info.world_size)
        self.images_per_step = cfg.batch_size

    def batches(self, start_step: int) -> Iterator[torch.Tensor]:
        for _step, epoch, idx in self.sampler.batches(start_step):
            if hasattr(self.train_ds, "set_epoch"):
                self.train_ds.set_epoch(epoch)
            yield torch.stack([self.train_ds[int(i)][0] for i in idx]).to(self.device)

    def loss(
        self, model: nn.Module, batch: torch.Tensor, step: int, micro: int, num_micro: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        imgs = batch.chunk(num_micro)[micro]
        recon, commit, entropy = model(imgs, self.grids)  # the (DDP-wrapped) module's forward: gradients sync
        recon = recon.float()
        mse = F.mse_loss(recon, imgs)
        l1 = F.l1_loss(recon, imgs)
        cfg = self.cfg
        loss = mse + cfg.l1_weight * l1 + cfg.beta * commit + cfg.entropy_weight * entropy
        stats = {"loss": loss.item(), "mse": mse.item(), "commit": commit.item(), "entropy": entropy.item()}
        return loss / num_micro, stats

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_images: int = 512) -> dict[str, float]:
        vae = dist.unwrap(model)
        assert isinstance(vae, BSQVAE)
        n = min(max_images, len(self.val_ds))
        imgs = torch.stack([self.val_ds[i][0] for i in range(n)]).to(self.device)
        out: dict[str, float] = {}
        prefix_recons: list[list[torch.Tensor]] = [[] for _ in self.grids]
        ones = torch.zeros(vae.bits)
        for chunk in imgs.split(128):
            h = vae.encode_features(chunk)
            _, bits_list = vae.quantize(h, self.grids)
            summed = _prefix_sums(bits_list, self.grids)
            for si, s in enumerate(summed):
                prefix_recons[si].append(vae.decode(s))
            ones += torch.stack([b.reshape(-1, vae.bits).float().mean(0) for b in bits_list]).mean(0).cpu()
        for si in range(len(self.grids)):
            out[f"psnr_s{si}"] = psnr(torch.cat(prefix_recons[si]), imgs)
        out["psnr"] = out[f"psnr_s{len(self.grids) - 1}"]
        p = ones / max(1, (n + 127) // 128)
        out["bit_balance"] = float(torch.minimum(p, 1 - p).mean() / 0.5)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def export(self, out_dir: Path, model: nn.Module) -> Path:
        vae = dist.unwrap(model).eval()
        assert isinstance(vae, BSQVAE)
        extra = {"trained_on": self.cfg.data, "pn": self.cfg.pn, "image_size": list(self.schedule.image_size)}
        return save_bsq_tokenizer(out_dir / self.cfg.export_name, vae, extra)


def _prefix_sums(bits_list: list[torch.Tensor], grids: list[Grid]) -> list[torch.Tensor]:
    """The decoder input after each scale (codes from the bits, upsampled and summed as sampling does)."""
    full = grids[-1]
    total: torch.Tensor | float = 0.0
    sums = []
    for bits, grid in zip(bits_list, grids):
        codes = bits_to_codes(bits)
        total = total + (codes if grid == full else upsample_codes(codes, full))
        sums.append(total.squeeze(2))
    return sums
