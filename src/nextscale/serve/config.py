"""The server's settings, apart from FastAPI so that ``nextscale serve --help`` can show their defaults.

The engine's settings (token budget, KV memory, largest request) live in ``EngineConfig`` only: the server reads
them from the engine it serves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nextscale.errors import ConfigError

if TYPE_CHECKING:
    from nextscale.accel import AccelArg
    from nextscale.engine.raster.speculative import SpeculativePlan
    from nextscale.engine.var.plan import RequestPlan
    from nextscale.pipelines.raster import LlamaGenPipeline
    from nextscale.pipelines.var import VARPipeline


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


@dataclass(frozen=True)
class QualityPlan:
    """A ``quality`` level's plan and what it runs, as spec strings (``()``: exact) — what a preset resolved to on
    this model, which the server logs at start, lists in ``/v1/models`` and reports with every response."""

    plan: RequestPlan | SpeculativePlan | None
    methods: tuple[str, ...] = ()

    @classmethod
    def of(cls, plan: QualityPlan | RequestPlan | SpeculativePlan | None) -> QualityPlan:
        """A bare plan with the description it carries: a VAR plan names its plug-ins; a bare speculative plan
        knows only its rule and window (``speculative_plans`` keeps the spec)."""
        from nextscale.engine.var.plan import RequestPlan

        if plan is None or isinstance(plan, QualityPlan):
            return plan or cls(None)
        if isinstance(plan, RequestPlan):
            return cls(plan, plan.names)
        return cls(plan, (f"{type(plan.rule).__name__}:window={plan.window}",))


def quality_plans(pipe: VARPipeline, default: AccelArg = None) -> dict[str, QualityPlan]:
    """The plan of every ``quality`` level for ``pipe``'s model (its tuned presets when it has them); ``default``
    (``serve --accel``) is "auto". Plans that hand scales to a refiner need the engine built with ``pipe.refiner``."""
    from nextscale.accel import parse_spec

    plans = {q: pipe.plan(name) for q, name in QUALITY_PRESETS.items()}
    plans["auto"] = pipe.plan(default)
    # One engine runs one transformer: a method that changes the model (int8) is a server-wide choice.
    served = pipe.transformer_for(default)
    for q, name in QUALITY_PRESETS.items():
        if pipe.transformer_for(name) not in (served, pipe.transformer):
            raise ConfigError(
                f"quality {q!r} ({name}) runs a transformed model (e.g. int8) that the server does not; "
                f"add that method to serve --accel"
            )
    auto = plans["auto"]
    # Every level runs on the served model, so a server-wide transformation is part of what each level does.
    server_wide = [n for n in (auto.names if auto else ()) if parse_spec(n).transforms_model]
    out = {}
    for q in QUALITIES:
        plan = plans[q]
        names = plan.names if plan else ()
        out[q] = QualityPlan(plan, (*(n for n in server_wide if n not in names), *names))
    return out


def speculative_plans(pipe: LlamaGenPipeline, default: str | None = None) -> dict[str, QualityPlan]:
    """A raster model's plan per ``quality`` level: high is exact, medium and low the speculative presets
    ``balanced`` and ``fast`` (``nextscale.accel.speculative.PRESETS``, or the model's own); ``default``
    (``serve --speculative``, a spec, a preset or "exact") is "auto"."""
    levels = {"auto": default, **QUALITY_PRESETS}
    out = {}
    for q, name in levels.items():
        if name in (None, "exact"):
            out[q] = QualityPlan(None)
        else:  # the spec that rebuilds the method, defaults left out: "sjd", "gsd:dist=6"
            out[q] = QualityPlan(pipe.speculative_plan(name), (pipe.speculative_config(name).spec(),))
    return out
