"""What every transformer task on a frozen tokenizer shares: tokenize-once caching and conditioned batches.

Images are tokenised once (frozen VQ-VAE, float32) into a cache every run shares (``env.cache_dir()/tokens``):
a new run folder on the same data and tokenizer reuses the tokens instead of spending minutes recomputing them.
A cache file is named by a hash of what its tokens depend on (the images, how they are cropped and flipped, and
the tokenizer's config and weights), so a changed dataset or tokenizer never reuses stale tokens; it is written
atomically, so concurrent runs and ranks only ever read complete files. Each step then only indexes the tokens.

Condition dropout (a label replaced by the null class, so the model also learns the unconditional distribution
classifier-free guidance needs) is drawn for the GLOBAL batch from one task-owned generator and each rank takes
its slice: a run is the same on 1 or N processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextscale import env
from nextscale.data import ImageFolder, ShardedBatchSampler, TensorImageDataset
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.train import dist
from nextscale.train.checkpoint import save_atomic
from nextscale.train.loop import format_duration

log = logging.getLogger("nextscale.train")
CACHE_FORMAT = 2  # bump when the stored tokens or the key change meaning (1: per-run cache keyed by the data's name)
PROGRESS_EVERY_S = 10.0  # without a terminal, at most this long between tokenizing lines: minutes must not look hung


def token_cache_dir() -> Path:
    return env.cache_dir() / "tokens"


@dataclass
class TokenSet:
    idx_NL: torch.Tensor  # int32 tokens of every image, all scales concatenated (one scale: the raster grid)
    labels_N: torch.Tensor


class TokenizeProgress:
    """A tqdm bar on a terminal; in logs, a line at most every ``every_s`` seconds (never one for a quick pass)."""

    def __init__(
        self,
        total: int,
        what: str,
        enabled: bool,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.what, self.every_s, self.clock = total, what, every_s, clock
        self.done, self.t_start = 0, clock()
        self.t_line = self.t_start
        self.bar: Any = None
        self.lines = enabled
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar, self.lines = tqdm(total=total, desc=f"tokenizing {what}", unit="img", dynamic_ncols=True), False

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = self.clock()
        if not self.lines or now - self.t_line < self.every_s or self.done >= self.total:
            return
        eta_s = (self.total - self.done) * (now - self.t_start) / self.done
        log.info(
            "tokenizing %s: %d/%d images (%d%%), ETA %s",
            self.what,
            self.done,
            self.total,
            100 * self.done // self.total,
            format_duration(eta_s),
        )
        self.t_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def tokenize(vae: VQVAE, dataset, flip: bool, batch: int = 256, progress: TokenizeProgress | None = None) -> TokenSet:
    toks, labels = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        imgs = torch.stack([x for x, _ in items])
        if flip:
            imgs = imgs.flip(-1)
        toks.append(torch.cat(vae.img_to_idx(imgs.to(vae.quant_conv.weight.device)), dim=1).cpu().to(torch.int32))
        labels += [int(y) for _, y in items]
        if progress is not None:
            progress.update(len(items))
    return TokenSet(torch.cat(toks), torch.tensor(labels))


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    h.update(repr((str(t.dtype), tuple(t.shape))).encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the bytes, any dtype


def tokenizer_fingerprint(vae: VQVAE) -> str:
    """Hash of the tokenizer's config and every weight: any retrained or edited tokenizer gets new tokens."""
    h = hashlib.sha256(json.dumps(vae.cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """Hash of the images a dataset serves for tokenizing: the pixels of an in-memory set; for an image folder
    every file's path, size and modification time (reading every file would cost what tokenizing does) and the
    crop settings. A folder edited in place, or another folder of the same name, never shares tokens."""
    h = hashlib.sha256()
    if isinstance(dataset, TensorImageDataset):
        h.update(repr(("tensor", dataset.class_names)).encode())
        _hash_tensor(h, dataset.images)
        _hash_tensor(h, dataset.labels)
    elif isinstance(dataset, ImageFolder):
        d, root = dataset, os.path.abspath(dataset.root)
        crops = (d.image_size, d.channels, d.train, d.hflip, d.seed, d.epoch)
        h.update(repr(("folder", root, d.class_names, crops)).encode())
        for path, label in d.samples:
            st = path.stat()
            h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(dataset).__name__} for the token cache")
    return h.hexdigest()


def cache_path(vae: VQVAE, dataset, split: str, flips: bool) -> Path:
    """Where the tokens of ``dataset`` (and of its mirror image with ``flips``) are cached."""
    key = hashlib.sha256(
        repr((CACHE_FORMAT, split, flips, dataset_fingerprint(dataset), tokenizer_fingerprint(vae))).encode()
    ).hexdigest()[:20]
    return token_cache_dir() / f"tokens-{split}-{key}.pt"


def cached_tokens(vae: VQVAE, dataset, split: str, flips: bool, info: dist.DistInfo, progress: bool = True) -> TokenSet:
    """Tokens of ``dataset`` (and of its mirror image with ``flips``) from the shared cache; rank 0 computes and
    stores them when they are not there. A rank that still finds no file after rank 0 is done (a cache on a
    node-local disk) computes its own."""
    path = cache_path(vae, dataset, split, flips)
    n = len(dataset) * (2 if flips else 1)
    what = f"{len(dataset)} {split} images" + (" (+ mirrored)" if flips else "")
    tokens = None
    if info.is_main:
        tokens = _load(path, n, what) or _tokenize_and_store(vae, dataset, split, flips, path, what, progress)
    dist.barrier(info)
    if not info.is_main:
        tokens = _load(path, n, what) or _tokenize_and_store(vae, dataset, split, flips, path, what, False)
    assert tokens is not None
    return tokens


def _load(path: Path, n: int, what: str) -> TokenSet | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tokens = TokenSet(state["idx"], state["labels"])
    except Exception as e:  # a damaged cache file is recomputed, never fatal
        log.warning("cached tokens %s are unreadable (%s); tokenizing again", path, e)
        return None
    if tokens.idx_NL.ndim != 2 or len(tokens.idx_NL) != n or len(tokens.labels_N) != n:
        log.warning("cached tokens %s do not hold %d images; tokenizing again", path, n)
        return None
    log.info("reusing the cached tokens of %s from %s", what, path)
    return tokens


def _tokenize_and_store(
    vae: VQVAE, dataset, split: str, flips: bool, path: Path, what: str, progress: bool
) -> TokenSet:
    log.info("tokenizing %s once; the tokens are cached for later runs in %s", what, path.parent)
    bar = TokenizeProgress(len(dataset) * (2 if flips else 1), split, progress)
    t0 = time.perf_counter()
    try:
        sets = [tokenize(vae, dataset, flip, progress=bar) for flip in ((False, True) if flips else (False,))]
    finally:
        bar.close()
    tokens = TokenSet(torch.cat([s.idx_NL for s in sets]), torch.cat([s.labels_N for s in sets]))
    save_atomic({"idx": tokens.idx_NL, "labels": tokens.labels_N}, path)
    log.info("tokenized %s in %s", what, format_duration(time.perf_counter() - t0))
    return tokens


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
