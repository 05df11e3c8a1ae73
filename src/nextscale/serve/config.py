"""The server's settings, apart from FastAPI so that ``nextscale serve --help`` can show their defaults.

The engine's settings (token budget, KV memory, largest request) live in ``EngineConfig`` only: the server reads
them from the engine it serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nextscale.errors import ConfigError

if TYPE_CHECKING:
    from nextscale.accel import AccelArg
    from nextscale.engine.plan import RequestPlan
    from nextscale.engine.speculative import SpeculativePlan
    from nextscale.pipeline import VARPipeline
    from nextscale.raster_pipeline import LlamaGenPipeline


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
    (``serve --accel``) is "auto". Plans that hand scales to a refiner need the engine built with ``pipe.refiner``."""
    plans: dict[str, RequestPlan | None] = {q: pipe.plan(name) for q, name in QUALITY_PRESETS.items()}
    plans["auto"] = pipe.plan(default)
    # One engine runs one transformer: a method that changes the model (int8) is a server-wide choice.
    served = pipe.transformer_for(default)
    for q, name in QUALITY_PRESETS.items():
        if pipe.transformer_for(name) not in (served, pipe.transformer):
            raise ConfigError(
                f"quality {q!r} ({name}) runs a transformed model (e.g. int8) that the server does not; "
                f"add that method to serve --accel"
            )
    return plans


def speculative_plans(pipe: LlamaGenPipeline, default: str | None = None) -> dict[str, SpeculativePlan | None]:
    """A raster model's plan per ``quality`` level: high is exact, medium and low the speculative presets
    ``balanced`` and ``fast`` (``nextscale.accel.speculative.PRESETS``); ``default`` (``serve --speculative``, a
    spec, a preset or "exact") is "auto"."""
    plans: dict[str, SpeculativePlan | None] = {
        q: None if name == "exact" else pipe.speculative_plan(name) for q, name in QUALITY_PRESETS.items()
    }
    plans["auto"] = None if default in (None, "exact") else pipe.speculative_plan(default)
    return plans
