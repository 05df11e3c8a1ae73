"""Transformer training on a frozen tokenizer: the official VAR recipe on any labelled image set.

Images are tokenised once (frozen VQ-VAE, float32) into the token cache all runs share (``train.tokens``, shared
with the raster task); each step rebuilds the teacher-forcing input from the tokens. Loss: per-token cross-entropy
(optional label smoothing), weighted 1/L per position and summed — the official weighting — with 10 % of the
labels replaced by the null class (condition dropout, drawn for the global batch so the run does not depend on
the number of ranks).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.config import VARConfig
from nextscale.data import ShardedBatchSampler, load_dataset
from nextscale.errors import CheckpointError
from nextscale.models.native_var import load_native, load_tokenizer, save_native
from nextscale.models.var import VAR
from nextscale.models.weights import load_official_var
from nextscale.train import dist
from nextscale.train.config import VARTrainConfig
from nextscale.train.optim import progressive_stage
from nextscale.train.tokens import TokenSet, cached_tokens, conditioned_batches

log = logging.getLogger("nextscale.train")


def split_scales(idx_BL: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    out, cur = [], 0
    for pn in patch_nums:
        out.append(idx_BL[:, cur : cur + pn * pn].long())
        cur += pn * pn
    return out


def resize_class_embedding(sd: dict[str, torch.Tensor], num_classes: int, init_std: float) -> dict[str, torch.Tensor]:
    """Keep the first classes and the null row of a pretrained class embedding; new classes start random."""
    old = sd["class_emb.weight"]
    if old.shape[0] == num_classes + 1:
        return sd
    new = torch.randn(num_classes + 1, old.shape[1]) * init_std
    keep = min(num_classes, old.shape[0] - 1)
    new[:keep] = old[:keep]
    new[-1] = old[-1]
    log.info(
        "class embedding resized from %d+1 to %d+1 rows (kept %d classes and the null row)",
        old.shape[0] - 1,
        num_classes,
        keep,
    )
    return {**sd, "class_emb.weight": new}


class VARTask:
    def __init__(self, cfg: VARTrainConfig, info: dist.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.vae = load_tokenizer(cfg.tokenizer).to(device).eval().requires_grad_(False)
        vcfg = self.vae.cfg
        # Refuse what can be refused before the data is read, let alone tokenized: the scales the settings name and
        # the transformer's shape, built on the meta device (no memory, no time).
        with torch.device("meta"):
            VAR(cfg.var_config(vcfg, ("?",)))
        self.patch_nums = vcfg.patch_nums
        train_ds = load_dataset(cfg.data, "train", vcfg.image_size, vcfg.in_channels, root=cfg.data_root)
        val_ds = load_dataset(cfg.data, "test", vcfg.image_size, vcfg.in_channels, root=cfg.data_root)
        self.class_names = tuple(train_ds.class_names)
        var_cfg = cfg.var_config(vcfg, self.class_names)
        torch.manual_seed(cfg.seed)
        pretrained = self._pretrained(cfg.init_from, var_cfg) if cfg.init_from else None
        if pretrained is not None:  # fine-tuning: the architecture is the pretrained one's
            var_cfg = dataclasses.replace(
                pretrained.cfg,
                num_classes=var_cfg.num_classes,
                class_names=var_cfg.class_names,
                cond_drop_rate=cfg.cond_drop,
                drop_path_rate=cfg.drop_path_rate,
            )
        self.model = VAR(var_cfg)
        self.model.init_weights(init_adaln_gamma=cfg.init_adaln_gamma)
        if pretrained is not None:
            sd = resize_class_embedding(
                {k: v.float() for k, v in pretrained.state_dict().items()},
                var_cfg.num_classes,
                (1 / var_cfg.embed_dim / 3) ** 0.5,
            )
            self.model.load_state_dict(sd, strict=True)
            log.info("initialised from %s", cfg.init_from)
        self.model.train()
        self.generators = {"data": torch.Generator().manual_seed(cfg.seed + 101)}
        per_rank = cfg.batch_size // info.world_size
        n = len(train_ds) * (2 if cfg.hflip else 1)  # the mirrored copies are tokenized as images of their own
        self.sampler = ShardedBatchSampler(n, per_rank, cfg.seed, info.rank, info.world_size)
        self.images_per_step = cfg.batch_size
        L = self.model.scales.seq_len
        first = self.model.scales.begin_ends[cfg.loss_from_scale][0]
        self.loss_weight_L = torch.full((L,), 1.0 / (L - first), device=device)
        self.loss_weight_L[:first] = 0.0  # earlier scales condition the trained ones but are not trained
        # Last, once every setting has been accepted: the one slow step (minutes on a full dataset, then cached).
        self.train_tokens = self._tokens(train_ds, "train")
        self.val_tokens = self._tokens(val_ds, "test", flips=False)

    # ---- data ------------------------------------------------------------------------------------------------
    def _tokens(self, dataset, split: str, flips: bool | None = None) -> TokenSet:
        """Tokens of ``dataset`` (and of its mirror image with hflip), from the cache all runs share."""
        flips = self.cfg.hflip if flips is None else flips
        return cached_tokens(self.vae, dataset, split, flips, self.info, self.cfg.progress)

    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return conditioned_batches(
            self.train_tokens,
            self.sampler,
            start_step,
            self.cfg.cond_drop,
            self.model.num_classes,
            self.generators["data"],
            self.info,
            self.device,
        )

    # ---- loss --------------------------------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int, micro: int, num_micro: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        idx_BL, labels_B = (t.chunk(num_micro)[micro] for t in batch)
        cfg = self.cfg
        S = len(self.patch_nums)
        stage = progressive_stage(step, cfg.steps, cfg.warmup_steps, cfg.progressive, cfg.pg0, S)
        used = S if stage < 0 else stage + 1
        L = self.model.scales.begin_ends[used - 1][1]
        with torch.no_grad():
            x_in = self.vae.quantize.idx_to_var_input(split_scales(idx_BL, self.patch_nums))
        logits_BLV = model(labels_B, x_in, num_scales=used)
        gt_BL = idx_BL[:, :L].long()
        ce_BL = F.cross_entropy(
            logits_BLV.float().transpose(1, 2), gt_BL, label_smoothing=cfg.label_smoothing, reduction="none"
        )
        weight_L = self.loss_weight_L[:L].clone()
        if stage >= 0 and stage < S - 1:
            # The newest scale's weight ramps up over pgwp steps after it is added (official prog_wp).
            b, e = self.model.scales.begin_ends[stage]
            ramp_steps = max(1, cfg.steps // 300)
            weight_L[b:e] *= min(1.0, (step - self._stage_start(step, stage)) / ramp_steps)
        loss = ce_BL.mul(weight_L).sum(-1).mean()
        with torch.no_grad():
            acc = (logits_BLV.argmax(-1) == gt_BL).float().mean().item()
        return loss / num_micro, {"loss": ce_BL.mean().item(), "acc": acc}

    def _stage_start(self, step: int, stage: int) -> int:
        cfg, S = self.cfg, len(self.patch_nums)
        s = step
        while s > 0 and progressive_stage(s - 1, cfg.steps, cfg.warmup_steps, cfg.progressive, cfg.pg0, S) == stage:
            s -= 1
        return s

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    # ---- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_images: int = 2000) -> dict[str, float]:
        var = dist.unwrap(model)
        n = min(max_images, len(self.val_tokens.labels_N))
        S = len(self.patch_nums)
        ce_sum = torch.zeros(S)
        hit_sum = torch.zeros(S)
        for start in range(0, n, 250):
            idx_BL = self.val_tokens.idx_NL[start : start + 250].to(self.device)
            labels = self.val_tokens.labels_N[start : start + 250].to(self.device)
            x_in = self.vae.quantize.idx_to_var_input(split_scales(idx_BL, self.patch_nums))
            logits = var(labels, x_in)
            gt = idx_BL.long()
            ce = F.cross_entropy(logits.transpose(1, 2), gt, reduction="none")
            hit = (logits.argmax(-1) == gt).float()
            for si, (b, e) in enumerate(var.scales.begin_ends):
                ce_sum[si] += ce[:, b:e].mean(-1).sum().cpu()
                hit_sum[si] += hit[:, b:e].mean(-1).sum().cpu()
        counts = torch.tensor([pn * pn for pn in self.patch_nums], dtype=torch.float)
        out = {
            "loss": float((ce_sum * counts).sum() / counts.sum() / n),
            "acc": float((hit_sum * counts).sum() / counts.sum() / n),
            "acc_tail": float(hit_sum[-1] / n),
        }
        out.update({f"acc_s{si}": float(hit_sum[si] / n) for si in range(S)})
        return out

    # ---- state, export -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def export(self, out_dir: Path, model: nn.Module) -> Path:
        var = dist.unwrap(model).eval()
        assert isinstance(var, VAR)
        return save_native(
            out_dir / self.cfg.export_name,
            var,
            self.vae.cpu() if self.device.type != "cpu" else self.vae,
            {"trained_on": self.cfg.data},
        )

    @staticmethod
    def _pretrained(source: str, want: VARConfig) -> VAR:
        p = Path(source)
        pre = load_native(p)[0] if p.is_dir() else load_official_var(p)
        have = (pre.cfg.patch_nums, pre.cfg.vocab_size, pre.cfg.z_channels)
        need = (want.patch_nums, want.vocab_size, want.z_channels)
        if have != need:
            raise CheckpointError(
                f"{source}: cannot fine-tune from it with this tokenizer: (patch_nums, codebook, "
                f"code dim) {have} != {need}"
            )
        return pre
