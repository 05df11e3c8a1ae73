"""What a raster (LlamaGen) request carries into the engine: its sampling parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nextscale.config import MAX_CFG
from nextscale.engine.params import RngMode, SeededParams
from nextscale.errors import InvalidInputError


@dataclass(frozen=True)
class RasterParams(SeededParams):
    """How LlamaGen draws tokens, in the official ``generate()`` / ``sample_c2i.py`` conventions.

    ``cfg_scale > 1`` guides every image with a null-class row: ``uncond + (cond - uncond) * cfg_scale``; at
    ``cfg_scale <= 1`` there is no null row at all (plain conditional logits). ``cfg_interval > -1`` stops guidance
    after that many decode steps: token t >= 1 is guided iff ``t - 1 <= cfg_interval`` (token 0 always is).
    Logits are divided by ``max(temperature, 1e-5)``, then top-k (0 = off) and top-p (1.0 = off) filter them.
    ``rng`` as in VAR: ``"per_image"`` gives image i its own generator from (seed, i), so it does not depend on the
    batch; ``"official"`` is one generator for the batch — with ``seed`` it reproduces ``torch.manual_seed(seed)``
    followed by the official ``generate()`` on the CPU.
    """

    cfg_scale: float = 4.0
    cfg_interval: float = -1
    temperature: float = 1.0
    top_k: int = 2000
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("cfg_scale", "cfg_interval", "temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidInputError(f"{name} must be a finite number, got {v!r}")
        if not 0 <= self.cfg_scale <= MAX_CFG:
            raise InvalidInputError(
                f"cfg_scale must be in [0, {MAX_CFG:g}] (<= 1 means unguided), got {self.cfg_scale}"
            )
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in [0, 1] (1 = off), got {self.top_p!r}")
        super().__post_init__()

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], seed: int | None = None, rng: RngMode = "per_image"
    ) -> RasterParams:
        """From settings as ``LlamaGenPipeline``'s call and a model folder's ``sampling_defaults`` name them
        (``cfg``, ``cfg_interval``, ``temperature``, ``top_k``, ``top_p``; ``cfg`` is ``cfg_scale``)."""
        s = settings
        return cls(
            cfg_scale=s["cfg"],
            cfg_interval=s["cfg_interval"],
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            seed=seed,
            rng=rng,
        )

    def as_settings(self) -> dict[str, Any]:
        """The inverse of ``from_settings``, seed and rng included."""
        return {
            "cfg": self.cfg_scale,
            "cfg_interval": self.cfg_interval,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "rng": self.rng,
        }

    @property
    def guided(self) -> bool:
        """Whether there are null-class rows at all (official: only when ``cfg_scale > 1.0``)."""
        return self.cfg_scale > 1.0

    def guided_at(self, t: int) -> bool:
        """Whether token ``t`` is drawn from guided logits (official ``decode_n_tokens``: step i = t - 1 is
        unguided from ``i > cfg_interval`` on, when ``cfg_interval > -1``; the prefill's token 0 always is)."""
        if not self.guided:
            return False
        return t == 0 or self.cfg_interval <= -1 or t - 1 <= self.cfg_interval
