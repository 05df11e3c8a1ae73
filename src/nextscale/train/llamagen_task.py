"""Raster-order training: a LlamaGen c2i GPT on a frozen single-scale tokenizer, as LlamaGen's ``train_c2i.py``.

The tokenizer is a nextscale VQ-VAE with one scale (``patch_nums=(g,)``: a plain VQ-VAE whose g x g token grid is
read in raster order). Images are tokenised once into the token cache all runs share, and batches carry condition
dropout drawn for the global batch (``train.tokens``, shared with the VAR task). One step, as ``train_c2i.py``:

    _, loss = model(cond_idx=c_indices, idx=z_indices[:, :-1], targets=z_indices)

the input is [class token, z_0 .. z_{L-2}], output j predicts z_j, and the loss is the cross-entropy averaged
over all B x L image tokens (every position weighs the same: no per-scale weighting as in VAR). 10 % of the labels
are the null class (``--class-dropout-prob 0.1``), which teaches the unconditional branch classifier-free
guidance samples with. Unlike ``train_c2i.py`` there is no token/residual dropout (its 0.1 regularises
300-epoch ImageNet runs; ``LlamaGen`` has no dropout layers) and the class drop is the trainer's, not the
embedding's, so forward passes stay deterministic.

The export is a native raster folder (``LlamaGenPipeline.from_pretrained``): the GPT as ``transformer/``, the
tokenizer as ``vae/``, the class names in ``model_index.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.data import ShardedBatchSampler, load_dataset
from nextscale.models.llamagen import LlamaGen
from nextscale.models.native_raster import save_raster_native
from nextscale.models.native_var import load_tokenizer
from nextscale.train import dist
from nextscale.train.config import LlamaGenTrainConfig
from nextscale.train.tokens import TokenSet, cached_tokens, conditioned_batches

log = logging.getLogger("nextscale.train")


def init_weights(gpt: LlamaGen, std: float = 0.02) -> None:
    """The official ``Transformer.initialize_weights`` (LlamaGen ``autoregressive/models/gpt.py``): every Linear
    and Embedding weight N(0, ``initializer_range`` = 0.02), RMSNorm weights 1, then the output head zero, so every
    logit is 0 at the start and the first loss is exactly ln(codebook size)."""
    for m in gpt.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
    nn.init.zeros_(gpt.output.weight)


class LlamaGenTask:
    def __init__(self, cfg: LlamaGenTrainConfig, info: dist.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.vae = load_tokenizer(cfg.tokenizer).to(device).eval().requires_grad_(False)
        vcfg = self.vae.cfg
        # Refuse what can be refused before the data is read, let alone tokenized: a multi-scale tokenizer, and the
        # GPT's shape, built on the meta device (no memory, no time).
        with torch.device("meta"):
            LlamaGen(cfg.gpt_config(vcfg, 1))
        train_ds = load_dataset(cfg.data, "train", vcfg.image_size, vcfg.in_channels, root=cfg.data_root)
        val_ds = load_dataset(cfg.data, "test", vcfg.image_size, vcfg.in_channels, root=cfg.data_root)
        self.class_names = tuple(train_ds.class_names)
        torch.manual_seed(cfg.seed)
        self.model = LlamaGen(cfg.gpt_config(vcfg, len(self.class_names)))
        init_weights(self.model)
        self.model.train()
        self.generators = {"data": torch.Generator().manual_seed(cfg.seed + 101)}
        n, per_rank = len(train_ds) * (2 if cfg.hflip else 1), cfg.batch_size // info.world_size
        self.sampler = ShardedBatchSampler(n, per_rank, cfg.seed, info.rank, info.world_size)
        self.images_per_step = cfg.batch_size
        # Last, once every setting has been accepted: the one slow step (minutes on a full dataset, then cached).
        self.train_tokens = cached_tokens(self.vae, train_ds, "train", cfg.hflip, info, cfg.progress)
        self.val_tokens = cached_tokens(self.vae, val_ds, "test", False, info, cfg.progress)

    # ---- data ------------------------------------------------------------------------------------------------
    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return conditioned_batches(
            self.train_tokens,
            self.sampler,
            start_step,
            self.cfg.cond_drop,
            self.model.cfg.null_class,
            self.generators["data"],
            self.info,
            self.device,
        )

    # ---- loss --------------------------------------------------------------------------------------------------
    @staticmethod
    def _token_ce(model: nn.Module, idx_BL: torch.Tensor, labels_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy [B, L] and logits [B, L, V] of teacher forcing over the whole grid."""
        gt_BL = idx_BL.long()
        # train_c2i.py: model(cond_idx=c, idx=z[:, :-1], targets=z): L positions (class token + L-1 image tokens),
        # output j predicts image token j.
        logits_BLV = model(gt_BL[:, :-1], labels_B)
        ce_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), gt_BL, reduction="none")
        return ce_BL, logits_BLV

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int, micro: int, num_micro: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        idx_BL, labels_B = (t.chunk(num_micro)[micro] for t in batch)
        ce_BL, logits_BLV = self._token_ce(model, idx_BL, labels_B)
        loss = ce_BL.mean()  # train_c2i.py: F.cross_entropy over every token of the batch (mean)
        with torch.no_grad():
            acc = (logits_BLV.argmax(-1) == idx_BL.long()).float().mean().item()
        return loss / num_micro, {"loss": loss.item(), "acc": acc}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    # ---- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_images: int = 1000) -> dict[str, float]:
        """Validation cross-entropy and next-token accuracy, plus the loss with every label replaced by the null
        class: ``class_gain`` (nats per token) is what the class is worth, the signal guidance amplifies."""
        gpt = dist.unwrap(model)
        assert isinstance(gpt, LlamaGen)
        val: TokenSet = self.val_tokens
        n = min(max_images, len(val.labels_N))
        ce = ce_null = hits = 0.0
        for start in range(0, n, 250):
            idx_BL = val.idx_NL[start : min(start + 250, n)].to(self.device)
            labels_B = val.labels_N[start : min(start + 250, n)].to(self.device)
            ce_BL, logits = self._token_ce(gpt, idx_BL, labels_B)
            ce += float(ce_BL.mean(-1).sum())
            hits += float((logits.argmax(-1) == idx_BL.long()).float().mean(-1).sum())
            null_B = torch.full_like(labels_B, gpt.cfg.null_class)
            ce_null += float(self._token_ce(gpt, idx_BL, null_B)[0].mean(-1).sum())
        return {"loss": ce / n, "acc": hits / n, "loss_null": ce_null / n, "class_gain": (ce_null - ce) / n}

    # ---- state, export -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def export(self, out_dir: Path, model: nn.Module) -> Path:
        """A native raster folder at ``out_dir/model`` (GPT in float32; a bundled copy may store it in float16)."""
        gpt = dist.unwrap(model)
        assert isinstance(gpt, LlamaGen)
        extra = {"trained_on": self.cfg.data, "class_names": list(self.class_names)}
        return save_raster_native(out_dir / self.cfg.export_name, gpt, self.vae, extra)
