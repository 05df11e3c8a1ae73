"""The server's settings, apart from FastAPI so that ``nextscale serve --help`` can show their defaults.

The engine's settings (token budget, KV memory, largest request) live in ``EngineConfig`` only: the server reads
them from the engine it serves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nextscale.errors import InvalidInputError

if TYPE_CHECKING:
    from nextscale.accel import AccelArg
    from nextscale.engine.plan import RequestPlan
    from nextscale.pipeline import VARPipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "nextscale"
    max_queue: int = 64  # requests waiting to start before new ones get 429
    drain_timeout: float = 60.0  # seconds to finish in-flight work on shutdown


# A request's ``quality`` (the OpenAI images API's field) picks a preset; "auto" is the server's default.
QUALITY_PRESETS = {"high": "exact", "medium": "balanced", "low": "fast"}
QUALITIES = ("auto", *QUALITY_PRESETS)


def quality_plans(pipe: VARPipeline, default: AccelArg = None) -> dict[str, RequestPlan | None]:
    """The plan of every ``quality`` level for ``pipe``'s model (its tuned presets when it has them); ``default``
    (``serve --accel``) is "auto". The engine does not serve collaborative decoding yet, so a preset that would use
    the model's refiner falls back to the model's one-model variant (said in the log)."""
    from nextscale.accel import PRESETS_WITHOUT_REFINER

    plans: dict[str, RequestPlan | None] = {}
    for quality, name in QUALITY_PRESETS.items():
        plan = pipe.plan(name)
        if plan is not None and plan.uses_refiner:
            log.info(
                "quality=%s: the %s preset uses the refiner, which the engine does not serve yet; serving %s",
                quality,
                name,
                PRESETS_WITHOUT_REFINER[name],
            )
            plan = pipe.plan(PRESETS_WITHOUT_REFINER[name])
        plans[quality] = plan
    plans["auto"] = pipe.plan(default)
    if plans["auto"] is not None and plans["auto"].uses_refiner:
        raise InvalidInputError("--accel code: the engine does not serve collaborative decoding yet")
    return plans
