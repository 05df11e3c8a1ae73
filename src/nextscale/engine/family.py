"""The seam between the family-agnostic engine and a model family (vLLM v1's one model-runner interface).

The engine loop (``engine.py``), the scheduler and the KV pool never name a family: they talk to a ``Family`` object,
built by the family's own module (``engine/var/family.py``, ``engine/raster/family.py``) around a loaded model and
handed to ``Engine``. A family answers five questions:

- KV geometry: the bytes of one KV-pool row (the engine turns its memory budget into rows) and its pool(s);
- admission: how a request's condition (class labels, prompts), params and plan become scheduler units (rows held,
  tokens per unit);
- start: how an admitted request becomes a ``RequestState`` over its rows of the pool;
- execution: how a list of scheduled states runs as one fused forward, reported as one ``StepResult`` each;
- pixels: previews of a request in progress and the (resumable) final decode of finished ones.

What the HTTP edge needs of a family (how a request body becomes its params, its facts) is the ``ServingFacts`` a
family offers beside it, so ``serve/`` names no family either.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class RequestState(Protocol):
    """One admitted request's progress, owned by its family; the engine only asks whether it is done, collects its
    tokens and releases it."""

    @property
    def done(self) -> bool: ...

    @property
    def tokens(self) -> list[torch.Tensor]: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class Units:
    """A request as the scheduler sees it: ``rows`` KV-pool rows held while it runs, and per unit the query tokens
    of one row (``tokens``) and the rows that compute them (``unit_rows``; empty: all ``rows``)."""

    rows: int
    tokens: tuple[int, ...]
    unit_rows: tuple[int, ...] = ()


@dataclass
class StepResult:
    """What one scheduled request's step did: the typed output of ``Family.execute``.

    ``advanced``: scheduler units completed (one VAR scale; the tokens a speculative pass fixed in every image).
    ``step``: the progress step completed in this step (a VAR scale, a raster row) or None when none completed;
    ``num_steps`` their count. ``latent``: what ``preview`` and the final decode read (VAR's f_hat, a raster
    request's tokens)."""

    advanced: int
    step: int | None
    num_steps: int
    latent: torch.Tensor | None = None


class Family(Protocol):
    """A model family as the engine drives it (see the module docstring)."""

    name: str  # "var", "raster", ...: what model_index.json names
    device: torch.device

    def kv_row_bytes(self) -> int:
        """Bytes of one KV-pool row over every model the family runs per request (a refiner's rows too)."""
        ...

    def allocate(self, max_rows: int) -> None:
        """Create the KV pool(s) of ``max_rows`` rows."""
        ...

    @property
    def pool(self) -> Any:
        """The main KV pool (``KVPool``), for accounting and tests."""
        ...

    def admit(self, condition: Any, params: Any, plan: Any) -> tuple[Any, Units]:
        """Validate a request (one-line errors) and say what the scheduler schedules: (its plan, its units).
        ``condition``: what the family generates from, one image per entry (``len``): class labels [B], prompts."""
        ...

    def start(self, condition: Any, params: Any, plan: Any, generators: Any, start: int, rows: int) -> RequestState:
        """The state of an admitted request over pool rows ``[start, start + rows)``."""
        ...

    def execute(self, states: Sequence[RequestState]) -> list[StepResult]:
        """Advance every scheduled state by one step as one fused forward; one result per state, in order."""
        ...

    def preview(self, state: RequestState, result: StepResult) -> torch.Tensor:
        """Partial images [B, C, H, W] in [0, 1] of a request in progress."""
        ...

    def serving_facts(self) -> ServingFacts:
        """What the HTTP edge needs of the model (see ``ServingFacts``)."""
        ...

    def decode_steps(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """The final decode of finished requests' latents (concatenated), piece by piece: the last piece is the
        images in [-1, 1]. A generator, so that nothing runs before the engine's decode job does."""
        ...


@dataclass(frozen=True)
class ServingFacts:
    """What the HTTP edge needs of a served model, per family: facts for ``/v1/models`` and validation, and how the
    API's sampling fields become the family's params. ``steps``: events per request (each with a preview), named by
    ``step_unit`` ("scale", "row")."""

    family: str
    step_unit: str
    image_size: int
    num_classes: int
    vocab_size: int
    steps: int
    class_names: tuple[str, ...]
    # (fields the body gave explicitly, every field's value, seed) -> params; raises InvalidInputError with ``param``
    make_params: Any = field(repr=False)
    warmup: Any = field(repr=False)  # () -> params of the one tiny generation before the server says it is ready
    # (every field's value, n) -> (the request's condition, how responses name it), raising ``bad_field``; None for a
    # class-conditional family, whose ``prompt``/``class_label`` and ``size`` the HTTP edge resolves to class labels
    make_condition: Any = field(default=None, repr=False)
    warmup_condition: Any = field(default=None, repr=False)  # () -> the warm-up's condition (None: class 0)

    def params(self, given: set[str], values: Mapping[str, Any], seed: int) -> Any:
        return self.make_params(given, values, seed)

    def warmup_params(self) -> Any:
        return self.warmup()

    def warmup_request(self) -> tuple[Any, Any]:
        """(condition, params) of the warm-up generation: one image."""
        condition = torch.tensor([0]) if self.warmup_condition is None else self.warmup_condition()
        return condition, self.warmup()


@dataclass(frozen=True)
class QualityPlan:
    """A ``quality`` level's plan (a family's; None: exact) and what it runs, as spec strings (``()``: exact) —
    what a preset resolved to on this model, which the server logs at start, lists in ``/v1/models`` and reports
    with every response. A pipeline's ``quality_plans`` makes them."""

    plan: Any
    methods: tuple[str, ...] = ()

    @classmethod
    def of(cls, plan: Any) -> QualityPlan:
        """A bare plan with the description it carries (its ``names``)."""
        if plan is None or isinstance(plan, QualityPlan):
            return plan or cls(None)
        return cls(plan, tuple(plan.names))


def bad_field(param: str, message: str) -> Exception:
    """An ``InvalidInputError`` that names the request field it is about (the API reports it as ``param``)."""
    from nextscale.errors import InvalidInputError

    e = InvalidInputError(message)
    e.param = param  # type: ignore[attr-defined]
    return e
