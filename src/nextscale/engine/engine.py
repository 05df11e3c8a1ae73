"""The continuous-batching engine: requests join at any iteration, each iteration fuses whatever is in flight.

    engine = Engine(VARFamily(var, vae), EngineConfig())    # or a pipeline's engine_family()
    rid = engine.add_request(torch.tensor([3, 3]), SamplingParams(seed=0), previews=True)
    while engine.has_unfinished():
        for event in engine.step(): ...          # one ScaleEvent per request advanced this iteration

``step()`` is vLLM's contract: ``scheduler.schedule()`` -> the runner executes the scheduled units as one fused
forward -> ``scheduler.update()``. A VAR request advances one scale per iteration; a raster request one token of
each of its rows (Flover's setting), or one speculative verification pass. Each request samples with its own
generators, so an image is the same whatever else is in flight (tested against the pipelines). Finished or aborted
requests free their KV rows at once.

The final decode of the requests that finish in one iteration is batched and resumable: it runs piece by piece
after the transformer iteration, and ``step(interrupt)`` can stop between pieces while new requests wait. Only a
decode expected to outlast the iteration pauses (``decode_slice``, with the decoder's time per image measured as
the engine runs): a short one costs an arrival little and is cheaper to finish than to defer (measurements in
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nextscale.engine.family import Family, RequestState
from nextscale.engine.sampling import cfg_rows
from nextscale.engine.scheduler import Scheduler, SchedulerConfig
from nextscale.errors import ConfigError, InvalidInputError
from nextscale.models.tokenizers import to_unit_range_


@dataclass(frozen=True)
class EngineConfig:
    # Batching policy (token budget, cheap scales, max running, cohorts). Leave its max_rows alone: the engine
    # sets it to the rows that kv_cache_mb holds, so the KV budget is stated once, in megabytes.
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache_mb: float = 4096.0  # memory for the KV caches of running requests
    # Largest n of one request; the server's HTTP limit too. 8 fills the playground's grid and keeps one
    # request from holding many of the running slots' KV rows (2 per image).
    max_images_per_request: int = 8
    # A finished batch's decode runs without pausing when it is expected to take at most this multiple of the
    # step's transformer iteration; longer ones pause between decoder pieces while requests wait (0: always).
    decode_slice: float = 1.0

    def __post_init__(self) -> None:
        if not self.kv_cache_mb > 0:
            raise ConfigError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        if self.max_images_per_request < 1:
            raise ConfigError(f"max_images_per_request must be >= 1, got {self.max_images_per_request}")
        if not self.decode_slice >= 0:
            raise ConfigError(f"decode_slice must be >= 0, got {self.decode_slice}")
        if self.scheduler.max_rows != SchedulerConfig.max_rows:
            raise ConfigError(
                f"scheduler.max_rows={self.scheduler.max_rows} is not used: the engine derives its "
                f"KV rows from kv_cache_mb; set kv_cache_mb instead"
            )


@dataclass
class ScaleEvent:
    """One request advanced one scale (a raster request: completed row ``si`` of its token grid). ``preview``:
    partial images [B, C, H, W] in [0, 1] when requested; ``images``/``tokens`` are filled when ``finished``."""

    request_id: str
    si: int
    num_scales: int
    finished: bool = False
    aborted: bool = False
    preview: torch.Tensor | None = None
    images: torch.Tensor | None = None
    tokens: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Decode:
    """The latents of requests that finished in one iteration, going through the decoder as one batch."""

    events: list[ScaleEvent]
    sizes: list[int]
    steps: Iterator[torch.Tensor]
    out: torch.Tensor | None = None
    seconds: float = 0.0  # decoding time so far, over all the steps it ran in

    @property
    def images(self) -> int:
        return sum(self.sizes)

    def run(self, interrupt: Callable[[], bool] | None) -> bool:
        """Run decoder pieces until the images are done (True) or ``interrupt()`` asks to yield (False)."""
        t0 = time.perf_counter()
        try:
            for piece in self.steps:
                self.out = piece
                if interrupt is not None and interrupt():
                    return False
            return True
        finally:
            self.seconds += time.perf_counter() - t0

    def finish(self) -> list[ScaleEvent]:
        assert self.out is not None
        for ev, img in zip(self.events, to_unit_range_(self.out).split(self.sizes)):
            ev.images = img
        return self.events


@dataclass
class _Request:
    condition: Any  # what the family generates from: class labels [B], a text-to-image family's prompts, ...
    params: Any  # the family's params (SeededParams: seed, rng, generators)
    previews: bool
    first_image_index: int
    arrival: float
    plan: Any  # the family's plan (None: exact), as its admission validated it
    state: RequestState | None = None


class Engine:
    def __init__(self, family: Family, cfg: EngineConfig | None = None):
        """``family``: the model family's engine side around a loaded model (``VARFamily(var, vae, refiner)``,
        ``RasterFamily(gpt, tokenizer)``; a pipeline's ``engine_family()``). The engine sizes the KV pool from
        ``cfg.kv_cache_mb`` and the family's row bytes, and never looks inside the family."""
        self.cfg = cfg or EngineConfig()
        self.family = family
        self.device = family.device
        max_rows = self._kv_rows(family.kv_row_bytes())
        family.allocate(max_rows)
        self.scheduler = Scheduler(replace(self.cfg.scheduler, max_rows=max_rows))
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.last_iteration_tokens = 0
        self._decodes: deque[_Decode] = deque()  # oldest first
        self._decoding: dict[str, _Decode] = {}  # request id -> its decode, until delivered or aborted
        self._decode_s_per_image: float | None = None  # measured on the last completed decode

    @property
    def pool(self) -> Any:
        """The family's main KV pool (accounting, tests)."""
        return self.family.pool

    def _kv_rows(self, row_bytes: int) -> int:
        """The KV-pool rows ``kv_cache_mb`` holds; the largest request must fit."""
        max_rows = int(self.cfg.kv_cache_mb * 2**20 // row_bytes)
        if max_rows < cfg_rows(self.cfg.max_images_per_request):
            raise InvalidInputError(
                f"kv_cache_mb={self.cfg.kv_cache_mb} holds {max_rows} rows of KV cache ({row_bytes / 2**20:.2f} MB "
                f"each); a request of max_images_per_request={self.cfg.max_images_per_request} needs "
                f"{cfg_rows(self.cfg.max_images_per_request)}"
            )
        return max_rows

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(
        self,
        condition: Any,
        params: Any,
        request_id: str | None = None,
        previews: bool = False,
        first_image_index: int = 0,
        plan: Any = None,
    ) -> str:
        """Queue a request: its condition (class labels [B] for a class-conditional family, an
        ``InfinityCondition`` for a text-to-image one: one image per entry, ``len(condition)``), the family's params
        (``SamplingParams`` for VAR, ``RasterParams`` for a raster model, ...) and, optionally, its plan (VAR: a
        ``RequestPlan`` from ``nextscale.accel``; raster: a ``SpeculativePlan``); the family validates all three."""
        if params.seed is None:
            raise InvalidInputError("engine requests need an explicit seed")
        n = len(condition)
        if not 1 <= n <= self.cfg.max_images_per_request:
            raise InvalidInputError(f"a request has 1..{self.cfg.max_images_per_request} images, got {n}")
        plan, units = self.family.admit(condition, params, plan)
        rid = request_id or f"req-{next(self._ids)}"
        self.scheduler.add(rid, units.rows, units.tokens, units.unit_rows)
        if isinstance(condition, torch.Tensor):
            condition = condition.to(self.device)
        self.requests[rid] = _Request(condition, params, previews, first_image_index, time.perf_counter(), plan)
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its cache is released immediately."""
        req = self.requests.pop(request_id, None)
        self.scheduler.abort(request_id)
        if req is not None and req.state is not None:
            req.state.release()
        job = self._decoding.pop(request_id, None)
        if job is not None and not any(ev.request_id in self._decoding for ev in job.events):
            self._decodes.remove(job)  # nobody left to deliver to: stop decoding
        return req is not None or job is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._decodes)

    def is_pending(self, request_id: str) -> bool:
        """Not yet delivered: waiting, running or being decoded."""
        return request_id in self.requests or request_id in self._decoding

    def is_running(self, request_id: str) -> bool:
        """Admitted: generating, holding its KV rows."""
        return request_id in self.scheduler.running

    @property
    def num_decoding(self) -> int:
        return len(self._decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---- one iteration --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, interrupt: Callable[[], bool] | None = None) -> list[ScaleEvent]:
        """One transformer iteration, then the pending final decodes (oldest first).

        ``interrupt``: called between the pieces of a long decode (see ``decode_slice``); returning True defers
        the rest of the decoding to the next step (a caller passes "are new requests waiting?"). Finished
        requests' events come out of the step that completes their decode.
        """
        t_start = time.perf_counter()
        out = self.scheduler.schedule()
        for rid in out.admitted:
            self._start(rid)
        self.last_iteration_tokens = out.tokens
        events, jobs = self._iteration(out)
        for job in jobs:
            self._decodes.append(job)
            self._decoding.update((ev.request_id, job) for ev in job.events)
        iteration_s = time.perf_counter() - t_start
        while self._decodes:
            job = self._decodes[0]
            short = (
                self._decode_s_per_image is not None
                and self._decode_s_per_image * job.images <= self.cfg.decode_slice * iteration_s
            )
            if not job.run(None if short else interrupt):
                break
            self._decode_s_per_image = job.seconds / job.images
            # requests aborted during the decode are no longer in ``_decoding``: their images are dropped
            events.extend(
                ev for ev in self._decodes.popleft().finish() if self._decoding.pop(ev.request_id, None) is not None
            )
        return events

    def _iteration(self, out: Any) -> tuple[list[ScaleEvent], list[_Decode]]:
        """Advance the scheduled requests one step each; an event per request that completed a progress step (a
        scale, a row of a token grid), and the finished ones' decode."""
        states = [self._state(rid) for rid in out.units]
        results = self.family.execute(states)
        finished = set(self.scheduler.update(out, {rid: r.advanced for rid, r in zip(out.units, results)}))
        events, done = [], []
        for rid, st, res in zip(out.units, states, results):
            if rid in finished:
                assert res.latent is not None
                ev = ScaleEvent(rid, res.num_steps - 1, res.num_steps, finished=True, tokens=st.tokens)
                st.release()
                del self.requests[rid]
                done.append((ev, res.latent))
            elif res.step is not None:
                ev = ScaleEvent(rid, res.step, res.num_steps)
                if self.requests[rid].previews:
                    ev.preview = self.family.preview(st, res)
                events.append(ev)
        # One decode batch per latent shape (requests of different image sizes finish together in a text-to-image
        # family), oldest first.
        by_shape: dict[tuple[int, ...], list[tuple[ScaleEvent, torch.Tensor]]] = {}
        for ev, x in done:
            by_shape.setdefault(tuple(x.shape[1:]), []).append((ev, x))
        jobs = []
        for group in by_shape.values():
            latent = torch.cat([x for _, x in group]) if len(group) > 1 else group[0][1]
            jobs.append(
                _Decode([ev for ev, _ in group], [x.shape[0] for _, x in group], self.family.decode_steps(latent))
            )
        return events, jobs

    def _state(self, rid: str) -> RequestState:
        state = self.requests[rid].state
        assert state is not None, "scheduled before it started"
        return state

    def _start(self, rid: str) -> None:
        req = self.requests[rid]
        gens = req.params.generators(len(req.condition), self.device, start=req.first_image_index)
        seq = self.scheduler.running[rid]
        req.state = self.family.start(req.condition, req.params, req.plan, gens, seq.slot, seq.rows)

    # ---- offline use -----------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[tuple[Any, Any]]) -> list[ScaleEvent]:
        """Run a list of (condition, params) requests to completion; returns their final events in input order."""
        ids = [self.add_request(condition, params) for condition, params in requests]
        done: dict[str, ScaleEvent] = {}
        while self.has_unfinished():
            done.update({e.request_id: e for e in self.step() if e.finished})
        return [done[i] for i in ids]

    def stream(self, condition: Any, params: Any, previews: bool = True) -> Iterator[ScaleEvent]:
        """One request's per-scale events, driving the engine (single-threaded use)."""
        rid = self.add_request(condition, params, previews=previews)
        while self.is_pending(rid):
            yield from (e for e in self.step() if e.request_id == rid)
