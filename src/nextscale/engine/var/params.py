"""What a VAR request carries into the engine: its sampling parameters and forced (known) tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nextscale.config import MAX_CFG
from nextscale.engine.params import SeededParams
from nextscale.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams(SeededParams):
    """How tokens are drawn at every scale.

    ``cfg`` uses VAR's convention: guided logits ``(1+t)*cond - t*uncond`` with ``t = cfg*si/(S-1)``, so
    ``cfg=0`` is unguided and the weight ramps up over the scales (VAR's cfg=1.5 is a diffusers-style
    guidance_scale of 2.5 at the last scale). ``top_k=0``/``top_p=0`` disable those filters.
    ``rng="per_image"`` gives image i of a request its own generator seeded from (seed, i), so it does not
    depend on batch size; ``rng="official"`` draws the whole batch from one generator seeded with ``seed``,
    reproducing ``autoregressive_infer_cfg(g_seed=seed)`` on the CPU.
    """

    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    more_smooth: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.cfg, bool)
            or not isinstance(self.cfg, (int, float))
            or not math.isfinite(self.cfg)
            or not 0 <= self.cfg <= MAX_CFG
        ):
            raise InvalidInputError(f"cfg must be a finite number in [0, {MAX_CFG:g}], got {self.cfg!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 <= self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in [0, 1] (0 = off), got {self.top_p!r}")
        super().__post_init__()

    def check_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise InvalidInputError(f"top_k={self.top_k} exceeds the codebook size {vocab_size}")


@dataclass
class ForcedTokens:
    """Known tokens for zero-shot editing: at scale si, positions where ``keep[si]`` is True take
    ``idx[si]`` instead of the sampled token (VAR paper Sec. 4.6; masks [B, pn*pn] bool)."""

    idx: list[torch.Tensor]
    keep: list[torch.Tensor]
