"""The plug-in contract, the registry, spec strings and presets.

A method is a frozen dataclass with a registry ``name``; ``apply`` edits the per-scale ``StepPlan`` list of a
request. Users name methods with spec strings ``"name:key=value,key=value"`` (lists as ``a/b/c``, layer ranges
as ``first-last``) or pass the objects; ``resolve`` turns either into an ordered, checked list, and
``build_plan`` into a ``RequestPlan``. Presets (``exact``, ``balanced``, ``fast``) are lists of specs; a model
folder may override them (``accel_presets`` in its ``model_index.json``, written by ``tune-accel``). ``describe``
says what a setting resolved to and where its specs came from, for logs, output stats and server responses.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import nn

from nextscale.engine.var.plan import EXACT, RequestPlan, StepPlan
from nextscale.errors import InvalidInputError

M = TypeVar("M", bound=nn.Module)  # a transformer of any family


@dataclass(frozen=True)
class PlanContext:
    """What a method may know about the model it plans for."""

    patch_nums: tuple[int, ...]
    depth: int
    refiner_depth: int | None = None  # None: the model has no refiner
    num_heads: int = 0
    kv_roles: Mapping[str, Any] | None = field(default=None, compare=False)  # the model folder's KV calibration
    # Non-square token maps (Infinity's h x w schedules): (h, w) per scale; empty: square maps of side
    # ``patch_nums[si]`` (VAR). With grids, ``patch_nums`` holds the heights.
    grids: tuple[tuple[int, int], ...] = ()
    family: str = "var"  # whose built-in presets apply (``PRESETS_BY_FAMILY``)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def token_counts(self) -> tuple[int, ...]:
        """Tokens of every scale: h x w, or pn x pn for square maps."""
        if self.grids:
            return tuple(h * w for h, w in self.grids)
        return tuple(pn * pn for pn in self.patch_nums)


@dataclass(frozen=True)
class Accel:
    """Base of every method: ``name`` (registry key), ``stage`` (application order: who assigns models runs
    before who prunes on them), ``conflicts`` (methods it cannot be combined with)."""

    name: ClassVar[str] = ""
    stage: ClassVar[int] = 50
    conflicts: ClassVar[tuple[str, ...]] = ()
    lossless: ClassVar[bool] = False

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        raise NotImplementedError

    # Methods that change the model rather than the plan (int8 weights) set this and override ``transform``;
    # callers keep one transformed copy per method and run the plan on it.
    transforms_model: ClassVar[bool] = False

    def transform(self, model: M) -> M:
        """A copy of ``model`` as this method runs it (never changes ``model`` itself)."""
        return model

    def spec(self) -> str:
        """The spec string that rebuilds this method (defaults left out)."""
        return spec_string(self.name, self)


REGISTRY: dict[str, type[Accel]] = {}


def register(cls: type[Accel]) -> type[Accel]:
    assert cls.name and cls.name not in REGISTRY, f"bad or duplicate method name {cls.name!r}"
    REGISTRY[cls.name] = cls
    return cls


# ---- spec strings ----------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> Accel:
    """``"fastvar:keep=0.4,scales=8/9"`` -> ``FastVAR(keep=0.4, scales=(8, 9))``; one-line errors."""
    name, _, rest = spec.strip().partition(":")
    cls = REGISTRY.get(name.strip())
    if cls is None:
        raise InvalidInputError(
            f"unknown acceleration method {name!r}; available: {', '.join(sorted(REGISTRY))} "
            f"(or a preset: {', '.join(PRESETS)})"
        )
    return cls(**parse_options(name, cls, rest))


def parse_options(name: str, cls: type, rest: str) -> dict[str, Any]:
    """``"key=value,key=value"`` -> the dataclass ``cls``'s keyword arguments, converted by its type hints (shared
    by every spec-string registry: acceleration methods, speculative decoding rules)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            allowed = ", ".join(fields) or "none"
            raise InvalidInputError(f"{name}: bad option {item!r}; options are key=value with key in: {allowed}")
        kwargs[key] = _convert(name, key, value.strip(), hints[key])
    return kwargs


def spec_string(name: str, obj: Any) -> str:
    """``name:key=value,...`` with the dataclass ``obj``'s non-default fields: the spec that rebuilds it."""
    opts = [
        f"{f.name}={_format(getattr(obj, f.name))}"
        for f in dataclasses.fields(obj)
        if getattr(obj, f.name) != f.default
    ]
    return name + (":" + ",".join(opts) if opts else "")


def _convert(method: str, key: str, text: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    try:
        if hint is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if hint in (int, float, str):
            return hint(text)
        if origin is tuple:  # "8/9" -> (8, 9); "2-14" -> (2, 14); "-2/-1" -> (-2, -1)
            parts = _int_items(text) if args[0] is int else [p for p in text.split("/") if p != ""]
            return tuple(args[0](p) for p in parts)
        if args:  # Optional[X] / X | None
            return None if text.lower() == "none" else _convert(method, key, text, args[0])
    except (TypeError, ValueError):
        pass
    raise InvalidInputError(f"{method}: option {key}={text!r} is not a valid {getattr(hint, '__name__', hint)}")


def _int_items(text: str) -> list[str]:
    """``a/b/c`` items, each a number or a range ``first-last`` (its two ends); a leading ``-`` is a sign, so
    ``-2/-1`` (scales counted from the end) stays (-2, -1) and a spec string rebuilds what wrote it."""
    out: list[str] = []
    for part in filter(None, text.split("/")):
        first, dash, last = part[1:].partition("-")
        out += [part[0] + first, last] if dash else [part]
    return out


def _format(value: Any) -> str:
    return "/".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


# ---- presets and resolution --------------------------------------------------------------------------------------
# Measured combinations (benchmarks/RESULTS.md, "Acceleration"): one model for balanced (guidance off for the last
# three scales, a quarter of the KV cache: 1.7x, 1.4 points of accuracy on the testbed, a quarter of the memory);
# fast adds token pruning and collaborative decoding where the model has a refiner. Without one, fast only drops
# guidance at the last two scales (SkipVAR's cutoff): it never drops a scale, which on a model with few scales is a
# quarter or more of its tokens (the demo's last scale: 64 of 130; skip-scales there cost 28 points of accuracy, the
# old cfg-cutoff + fastvar:keep=0.25 + skip-scales 33), and cfg-cutoff alone stays within fast's 5 points on both
# bundled models ("Presets on the demo"). A model's tuned presets (tune-accel) replace these.
PRESETS: dict[str, list[str]] = {
    "exact": [],
    "balanced": ["cfg-cutoff:last=3", "scalekv"],
    "fast": ["cfg-cutoff", "fastvar:keep=0.25", "code:draft=-3"],
}
PRESETS_WITHOUT_REFINER: dict[str, list[str]] = {"fast": ["cfg-cutoff"]}
# Text-to-image Infinity (no refiner), from the papers' Infinity-2B settings on the 13-scale 1024² schedule: SkipVAR's
# unconditional-branch replacement starts as early as scale 10 of 13 (the last three scales unguided), FastVAR's
# release prunes sides 32 and 40 (keep 0.6 / 0.5; ``fastvar:skip=`` leaves its scale skipping out) — balanced is the
# two; fast adds FastVAR's skipping of the two largest scales (48, 64: the summed codes decode as they are), i.e. the
# whole of ``fastvar``. Measured at 1024 px (benchmarks/RESULTS.md): balanced 1.9x, fast 6.5x the exact token phase.
# ScaleKV's 10 % budget is left out: its floor is what the drafter layers keep, which depends on the depth and the
# calibration (on a 2-block model it is half the cache); ask for ``scalekv:budget=0.1`` on a 32-block model.
PRESETS_BY_FAMILY: dict[str, dict[str, list[str]]] = {
    "infinity": {
        "exact": [],
        "balanced": ["cfg-cutoff:last=3", "fastvar:skip="],
        "fast": ["cfg-cutoff:last=3", "fastvar"],
    }
}

AccelSpec = str | Accel
AccelArg = AccelSpec | Sequence[AccelSpec] | None


def resolve(accel: AccelArg, ctx: PlanContext, presets: Mapping[str, Sequence[str]] | None = None) -> list[Accel]:
    """Specs, objects or a preset name -> the methods, in application order; incompatible sets refused."""
    if accel is None:
        return []
    items: list[AccelSpec] = [accel] if isinstance(accel, (str, Accel)) else list(accel)
    methods: list[Accel] = []
    for item in items:
        if isinstance(item, Accel):
            methods.append(item)
        elif isinstance(item, str) and item.strip() in PRESETS:
            methods += [parse_spec(s) for s in preset(item.strip(), ctx, presets)]
        elif isinstance(item, str):
            methods.append(parse_spec(item))
        else:
            raise InvalidInputError(f"accel entries are spec strings or plug-in objects, got {type(item).__name__}")
    seen: dict[str, Accel] = {}
    for m in methods:
        if m.name in seen:
            raise InvalidInputError(f"{m.name} is given twice ({seen[m.name].spec()} and {m.spec()})")
        seen[m.name] = m
    for a, b in itertools.combinations(methods, 2):
        if b.name in a.conflicts or a.name in b.conflicts:
            raise InvalidInputError(f"{a.name} and {b.name} cannot be combined (they act on the same resource)")
    return sorted(methods, key=lambda m: m.stage)


def preset(name: str, ctx: PlanContext, presets: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The specs of a preset: the model's own (tuned) ones first, else the built-in ones for its shape."""
    return _preset(name, ctx, presets)[0]


def _preset(name: str, ctx: PlanContext, presets: Mapping[str, Sequence[str]] | None) -> tuple[list[str], str]:
    """A preset's specs and where they come from (``Resolved.source``)."""
    if presets and name in presets:
        return list(presets[name]), TUNED
    if ctx.family in PRESETS_BY_FAMILY:
        return list(PRESETS_BY_FAMILY[ctx.family][name]), f"built-in preset for {ctx.family} models"
    if ctx.refiner_depth is None and name in PRESETS_WITHOUT_REFINER:
        return list(PRESETS_WITHOUT_REFINER[name]), "built-in preset for models without a refiner"
    return list(PRESETS[name]), BUILT_IN


# ---- what a setting resolved to ------------------------------------------------------------------------------------
TUNED, BUILT_IN, GIVEN, DEFAULT = "model's tuned preset", "built-in preset", "as given", "default"


@dataclass(frozen=True)
class Resolved:
    """What an acceleration setting runs, for logs and reports (VAR plug-ins and raster speculative decoding alike):
    ``requested`` as given (a preset name, or specs joined by ``+``), ``specs`` the spec strings that run, in
    application order (empty: exact), ``source`` where they came from (the model's tuned preset in its
    ``model_index.json``, a built-in preset, or as given)."""

    requested: str
    specs: tuple[str, ...]
    source: str

    def __str__(self) -> str:
        return f"{self.requested} -> {', '.join(self.specs) or 'no acceleration'} ({self.source})"

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "specs": list(self.specs), "source": self.source}


def describe(accel: AccelArg, ctx: PlanContext, presets: Mapping[str, Sequence[str]] | None = None) -> Resolved:
    """What ``accel`` (as ``resolve`` takes it) runs on a model of ``ctx`` with its tuned ``presets``: the checked
    specs in application order, and for presets where their specs came from. The one description that logs, output
    stats and server responses report."""
    methods = resolve(accel, ctx, presets)
    items = [] if accel is None else [accel] if isinstance(accel, (str, Accel)) else list(accel)
    names = [i.spec() if isinstance(i, Accel) else i.strip() for i in items]
    sources = {n: _preset(n, ctx, presets)[1] for n in names if n in PRESETS}
    if not names:
        source = DEFAULT
    elif len(names) == 1 and sources:
        source = sources[names[0]]
    else:
        parts = [f"{n}: {s}" for n, s in sources.items()]
        source = "; ".join(parts + ([f"the rest {GIVEN}" if parts else GIVEN] if len(sources) < len(names) else []))
    return Resolved(" + ".join(names) or "exact", tuple(m.spec() for m in methods), source)


def transform_key(methods: Sequence[Accel]) -> tuple[str, ...]:
    """The specs of the methods that change the model (empty: the plan runs on the model as it is)."""
    return tuple(m.spec() for m in methods if m.transforms_model)


def transform_model(methods: Sequence[Accel], model: M) -> M:
    for m in methods:
        if m.transforms_model:
            model = m.transform(model)
    return model


def build_plan(methods: Sequence[Accel], ctx: PlanContext) -> RequestPlan:
    steps = [EXACT] * ctx.num_scales
    for m in methods:
        steps = m.apply(list(steps), ctx)
        if len(steps) != ctx.num_scales:
            raise AssertionError(f"{m.name} returned {len(steps)} steps for {ctx.num_scales} scales")
    return RequestPlan(tuple(steps), tuple(m.spec() for m in methods))


def scale_index(method: str, si: int, ctx: PlanContext) -> int:
    """A scale given by index (negative counts from the end), checked."""
    S = ctx.num_scales
    if not -S <= si < S:
        raise InvalidInputError(f"{method}: scale {si} does not exist (the model has {S} scales, 0..{S - 1})")
    return si % S
