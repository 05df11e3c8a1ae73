"""The server's settings, apart from FastAPI so that ``nextscale serve --help`` can show their defaults.

The engine's settings (token budget, KV memory, largest request) live in ``EngineConfig`` only: the server reads
them from the engine it serves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nextscale.engine.family import QualityPlan
from nextscale.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "nextscale"
    max_queue: int = 64  # requests waiting to start before new ones get 429
    drain_timeout: float = 60.0  # seconds to finish in-flight work on shutdown

    def __post_init__(self) -> None:
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ConfigError(f"max_queue must be an int >= 1, got {self.max_queue!r}")
        if not (isinstance(self.drain_timeout, (int, float)) and math.isfinite(self.drain_timeout)) or (
            self.drain_timeout < 0
        ):
            raise ConfigError(f"drain_timeout must be a finite number of seconds >= 0, got {self.drain_timeout!r}")


# A request's ``quality`` (the OpenAI images API's field) picks a preset; "auto" is the server's default.
QUALITY_PRESETS = {"high": "exact", "medium": "balanced", "low": "fast"}
QUALITIES = ("auto", *QUALITY_PRESETS)


def quality_plans(pipe: Any, default: Any = None) -> dict[str, QualityPlan]:
    """The plan of every ``quality`` level for ``pipe``'s model (its tuned presets where it has them): high, medium
    and low are the presets exact, balanced and fast; ``default`` (``serve --accel`` / ``--speculative``: a preset, a
    spec or None for exact) is "auto". Any family's pipeline: it resolves its own presets."""
    return pipe.quality_plans({"auto": default, **QUALITY_PRESETS})
