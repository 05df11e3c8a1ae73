"""What an acceleration setting runs on one model, in one call: ``prepare(accel, model) -> (plan, refiner,
transformer)``.

The plan comes from the methods ``accel`` resolves to (presets: the model's tuned ones first); the refiner is the one
a method names (``code:refiner=DIR_OR_HUB_ID``) or the model's own, and is handed out only when the plan uses it;
the transformer is the model itself or its copy as the methods change it (int8 weights). The model loads named
refiners and keeps transformed copies itself (``AccelModel``), since where its weights live is its business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from nextscale.accel.base import (
    AccelArg,
    PlanContext,
    Resolved,
    build_plan,
    describe,
    resolve,
    transform_key,
    transform_model,
)
from nextscale.engine.var.plan import RequestPlan
from nextscale.models.var import VAR


class AccelModel(Protocol):
    """What ``prepare`` needs of a VAR model (``VARPipeline`` is one): its transformer and refiner, its folder's
    tuned presets and KV-cache calibration, and where named refiners and transformed copies come from."""

    @property
    def transformer(self) -> VAR: ...

    @property
    def refiner(self) -> VAR | None: ...

    @property
    def accel_presets(self) -> Mapping[str, Sequence[str]]: ...

    @property
    def kv_roles(self) -> Mapping[str, Any] | None: ...

    def load_refiner(self, name: str) -> VAR:
        """The refiner a spec names (a folder or hub id), loaded once, where the transformer is."""
        ...

    def transformed(self, key: tuple[str, ...], make: Callable[[VAR], VAR]) -> VAR:
        """The transformer as the methods ``key`` change it: ``make(transformer)``, made once and kept."""
        ...


class Prepared(NamedTuple):
    """A setting ready to run: its plan (None: exact), the refiner the plan hands off to (None: none), and the
    transformer it runs on."""

    plan: RequestPlan | None
    refiner: VAR | None
    transformer: VAR


def plan_context(model: AccelModel, refiner: VAR | None) -> PlanContext:
    """What a method may know about ``model``, planning with ``refiner`` (the model's own or a named one)."""
    var = model.transformer
    depth = None if refiner is None else refiner.depth
    return PlanContext(var.cfg.patch_nums, var.depth, depth, var.num_heads, model.kv_roles)


def prepare(accel: AccelArg, model: AccelModel) -> Prepared:
    """The plan of ``accel`` on ``model`` (checked before any sampling), its refiner and its transformer."""
    ctx = plan_context(model, model.refiner)
    methods = resolve(accel, ctx, model.accel_presets)
    if not methods:
        return Prepared(None, None, model.transformer)
    named = [m.refiner for m in methods if getattr(m, "refiner", "")]
    refiner = model.load_refiner(named[0]) if named else model.refiner
    plan = build_plan(methods, ctx if refiner is model.refiner else plan_context(model, refiner))
    key = transform_key(methods)
    transformer = model.transformed(key, lambda var: transform_model(methods, var)) if key else model.transformer
    return Prepared(plan, refiner if plan.uses_refiner else None, transformer)


def describe_setting(accel: AccelArg, model: AccelModel) -> Resolved:
    """What ``accel`` runs on ``model`` and where its specs came from (``describe``)."""
    return describe(accel, plan_context(model, model.refiner), model.accel_presets)
