"""What every transformer task on a frozen tokenizer shares: tokenize-once caching and conditioned batches.

Images are tokenised once (frozen VQ-VAE, float32) and cached under the run folder, keyed by everything the
tokens depend on; each step then only indexes the cached tokens. Condition dropout (a label replaced by the null
class, so the model also learns the unconditional distribution classifier-free guidance needs) is drawn for the
GLOBAL batch from one task-owned generator and each rank takes its slice: a run is the same on 1 or N processes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nextscale.data import ShardedBatchSampler
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.train import dist
from nextscale.train.checkpoint import save_atomic

log = logging.getLogger("nextscale.train")


@dataclass
class TokenSet:
    idx_NL: torch.Tensor  # int32 tokens of every image, all scales concatenated (one scale: the raster grid)
    labels_N: torch.Tensor


@torch.no_grad()
def tokenize(vae: VQVAE, dataset, flip: bool, batch: int = 256) -> TokenSet:
    toks, labels = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        imgs = torch.stack([x for x, _ in items])
        if flip:
            imgs = imgs.flip(-1)
        toks.append(torch.cat(vae.img_to_idx(imgs.to(vae.quant_conv.weight.device)), dim=1).cpu().to(torch.int32))
        labels += [int(y) for _, y in items]
    return TokenSet(torch.cat(toks), torch.tensor(labels))


def cached_tokens(
    vae: VQVAE, dataset, data: str, split: str, flips: bool, out_dir: str, info: dist.DistInfo
) -> TokenSet:
    """Tokens of ``dataset`` (and of its mirror image with ``flips``), computed by rank 0 once and cached in
    ``out_dir/cache``. The file name hashes the data, split, size, flips and the tokenizer (config + codebook),
    so a changed tokenizer never reuses stale tokens."""
    key = hashlib.sha256(
        repr(
            (
                data,
                split,
                len(dataset),
                flips,
                vae.cfg.to_dict(),
                float(vae.quantize.embedding.weight.detach().sum()),
            )
        ).encode()
    ).hexdigest()[:16]
    path = Path(out_dir) / "cache" / f"tokens-{split}-{key}.pt"
    if info.is_main and not path.is_file():
        log.info("tokenizing %d %s images%s", len(dataset), split, " (+ mirrored)" if flips else "")
        sets = [tokenize(vae, dataset, False)] + ([tokenize(vae, dataset, True)] if flips else [])
        save_atomic({"idx": torch.cat([s.idx_NL for s in sets]), "labels": torch.cat([s.labels_N for s in sets])}, path)
    dist.barrier(info)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return TokenSet(state["idx"], state["labels"])


def drop_conditions(
    labels_B: torch.Tensor, cond_drop: float, null_class: int, generator: torch.Generator, info: dist.DistInfo
) -> torch.Tensor:
    """This rank's labels with condition dropout applied: one uniform draw per image of the global batch
    (``world_size`` equal slices, this rank's is ``rank``), ``< cond_drop`` -> the null class."""
    world = info.world_size
    drop = torch.rand(len(labels_B) * world, generator=generator) < cond_drop
    return torch.where(drop.view(world, -1)[info.rank], null_class, labels_B)


def conditioned_batches(
    tokens: TokenSet,
    sampler: ShardedBatchSampler,
    start_step: int,
    cond_drop: float,
    null_class: int,
    generator: torch.Generator,
    info: dist.DistInfo,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [B, L] int32, labels [B] with condition dropout) of this rank for every step from ``start_step``."""
    for _step, _epoch, idx in sampler.batches(start_step):
        labels = drop_conditions(tokens.labels_N[idx], cond_drop, null_class, generator, info)
        yield tokens.idx_NL[idx].to(device), labels.to(device)
