"""Text features of a captioned dataset, computed once with the frozen text encoder and cached, like the tokens.

Every distinct caption is encoded once (padded to the longest caption of its chunk, not to 512: the valid tokens'
features are the same up to float rounding, and a CPU encodes them many times faster) and the packed features are
stored in ``env.cache_dir()/text``, named by a hash of the encoder (its config, every weight and its vocabulary) and
of the captions, written atomically. A step then only gathers rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nextscale import env
from nextscale.models.text_encoder import TextEncoder, TextFeatures
from nextscale.train import dist
from nextscale.train.checkpoint import save_atomic
from nextscale.train.loop import format_duration
from nextscale.train.tokens import _hash_tensor

log = logging.getLogger("nextscale.train")
CACHE_FORMAT = 1
ENCODE_CHUNK = 256


@dataclass
class CaptionFeatures:
    """Features of ``captions`` (distinct), packed: caption i is ``kv_NC[begin_N[i] : begin_N[i] + lens_N[i]]``."""

    captions: list[str]
    kv_NC: torch.Tensor
    lens_N: torch.Tensor

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.begin_N = torch.cat([torch.zeros(1, dtype=torch.long), self.lens_N.cumsum(0)[:-1]])

    def rows(self, ids: Sequence[int]) -> list[torch.Tensor]:
        """The feature rows [len_i, C] of caption ids ``ids``."""
        return [self.kv_NC[int(self.begin_N[i]) : int(self.begin_N[i] + self.lens_N[i])] for i in ids]

    def features(self, ids: Sequence[int]) -> TextFeatures:
        rows = self.rows(ids)
        return TextFeatures(torch.cat(rows), tuple(len(r) for r in rows))


def encoder_fingerprint(encoder: TextEncoder) -> str:
    """Hash of the encoder's config, weights and vocabulary: a retrained encoder never reuses stale features."""
    h = hashlib.sha256(encoder.encoder.config.to_json_string().encode())
    h.update(json.dumps(sorted(encoder.tokenizer.get_vocab().items())).encode())
    for name, t in sorted(encoder.encoder.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def cache_path(encoder: TextEncoder, captions: Sequence[str]) -> Path:
    h = hashlib.sha256(repr((CACHE_FORMAT, encoder_fingerprint(encoder))).encode())
    for c in captions:
        h.update(c.encode() + b"\0")
    return env.cache_dir() / "text" / f"text-{h.hexdigest()[:20]}.pt"


@torch.no_grad()
def encode_captions(encoder: TextEncoder, captions: Sequence[str]) -> CaptionFeatures:
    kv, lens = [], []
    for start in range(0, len(captions), ENCODE_CHUNK):
        f = encoder.encode(list(captions[start : start + ENCODE_CHUNK]), pad_to_max_length=False)
        kv.append(f.kv_compact.cpu())
        lens += f.lens
    return CaptionFeatures(list(captions), torch.cat(kv), torch.tensor(lens))


def cached_caption_features(encoder: TextEncoder, captions: Sequence[str], info: dist.DistInfo) -> CaptionFeatures:
    """Features of the distinct ``captions`` (in first-seen order) from the shared cache; rank 0 computes and
    stores them when they are not there."""
    distinct = list(dict.fromkeys(captions))
    path = cache_path(encoder, distinct)
    feats = None
    if info.is_main:
        feats = _load(path, distinct) or _encode_and_store(encoder, distinct, path)
    dist.barrier(info)
    if not info.is_main:
        feats = _load(path, distinct) or encode_captions(encoder, distinct)
    assert feats is not None
    return feats


def _load(path: Path, captions: list[str]) -> CaptionFeatures | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = CaptionFeatures(captions, state["kv"], state["lens"])
    except Exception as e:  # a damaged cache file is recomputed, never fatal
        log.warning("cached text features %s are unreadable (%s); encoding again", path, e)
        return None
    if len(feats.lens_N) != len(captions) or int(feats.lens_N.sum()) != len(feats.kv_NC):
        log.warning("cached text features %s do not hold %d captions; encoding again", path, len(captions))
        return None
    log.info("reusing the cached text features of %d captions from %s", len(captions), path)
    return feats


def _encode_and_store(encoder: TextEncoder, captions: list[str], path: Path) -> CaptionFeatures:
    t0 = time.perf_counter()
    feats = encode_captions(encoder, captions)
    save_atomic({"kv": feats.kv_NC, "lens": feats.lens_N}, path)
    log.info(
        "encoded %d distinct captions in %s (cached in %s)",
        len(captions),
        format_duration(time.perf_counter() - t0),
        path.parent,
    )
    return feats
