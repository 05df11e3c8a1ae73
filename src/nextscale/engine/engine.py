"""The continuous-batching engine: requests join at any iteration, each iteration fuses whatever is in flight.

    engine = Engine(var, vae, EngineConfig())
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
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from nextscale.engine.kv_cache import CompactKV, KVPool, compact_rows
from nextscale.engine.raster.runner import (
    RasterRunner,
    TokenDecoder,
    check_tokenizer,
    decode_steps,
    raster_pool,
    raster_row_bytes,
    row_preview,
)
from nextscale.engine.raster.sampler import RasterParams
from nextscale.engine.raster.speculative import SpeculativePlan
from nextscale.engine.raster.state import RasterGeneration, SpeculativeGeneration, raster_units
from nextscale.engine.sampling import cfg_rows
from nextscale.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.plan import RequestPlan
from nextscale.engine.var.runner import ModelRunner
from nextscale.engine.var.state import Generation
from nextscale.errors import ConfigError, InvalidInputError
from nextscale.models.llamagen import LlamaGen
from nextscale.models.tokenizers.msvq import VQVAE, to_unit_range_
from nextscale.models.var import VAR, check_refiner


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
    labels_B: torch.Tensor
    params: SamplingParams | RasterParams
    previews: bool
    first_image_index: int
    arrival: float
    plan: RequestPlan | SpeculativePlan | None  # a raster request: None (exact) or its speculative decoding
    state: Generation | RasterGeneration | SpeculativeGeneration | None = None


class Engine:
    def __init__(
        self,
        model: VAR | LlamaGen,
        tokenizer: VQVAE | TokenDecoder,
        cfg: EngineConfig | None = None,
        refiner: VAR | None = None,
    ):
        """``model`` picks the family: a ``VAR`` with its multi-scale ``VQVAE``, or a ``LlamaGen`` GPT with a raster
        tokenizer (``LlamaGenPipeline.tokenizer``).

        ``refiner`` (VAR): CoDe's small model for the late scales of requests whose plan hands off to it; its KV pool
        mirrors the transformer's rows (a request holds the same rows in both), so one allocator serves both."""
        self.cfg = cfg or EngineConfig()
        self.raster: RasterRunner | None = None  # the raster family's runner; None for VAR
        self.refiner: VAR | None = None
        self.refiner_pool: KVPool | None = None
        if isinstance(model, LlamaGen):
            if refiner is not None:
                raise InvalidInputError("a refiner is a VAR model's (collaborative decoding); raster models have none")
            if isinstance(tokenizer, VQVAE):
                raise InvalidInputError(
                    "a raster model needs a raster tokenizer: nextscale.pipelines.raster.make_tokenizer(vae, gpt.cfg)"
                )
            check_tokenizer(model, tokenizer)
            self.gpt, self.tokenizer = model.eval(), tokenizer
            self.device = model.output.weight.device
            max_rows = self._kv_rows(raster_row_bytes(model))
            self.pool = raster_pool(model, max_rows)
            self.raster = RasterRunner(model)
        else:
            if not isinstance(tokenizer, VQVAE):
                raise InvalidInputError(
                    f"a VAR model decodes with its multi-scale VQVAE, got {type(tokenizer).__name__}"
                )
            var = model
            self.var, self.vae = var.eval(), tokenizer.eval()
            self.refiner = None if refiner is None else check_refiner(var, refiner).eval()
            self.device = var.head.weight.device
            row_bytes = sum(
                2 * m.cfg.depth * m.cfg.seq_len * m.cfg.embed_dim * m.head.weight.element_size()
                for m in (var, refiner)
                if m is not None
            )
            max_rows = self._kv_rows(row_bytes)
            self.pool = KVPool.for_model(var, max_rows)
            self.refiner_pool = None if refiner is None else KVPool.for_model(refiner, max_rows)
            self.runner = ModelRunner(var)
        self.scheduler = Scheduler(replace(self.cfg.scheduler, max_rows=max_rows))
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.last_iteration_tokens = 0
        self._decodes: deque[_Decode] = deque()  # oldest first
        self._decoding: dict[str, _Decode] = {}  # request id -> its decode, until delivered or aborted
        self._decode_s_per_image: float | None = None  # measured on the last completed decode

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
        labels_B: torch.Tensor,
        params: SamplingParams | RasterParams,
        request_id: str | None = None,
        previews: bool = False,
        first_image_index: int = 0,
        plan: RequestPlan | SpeculativePlan | None = None,
    ) -> str:
        """Queue a request: ``SamplingParams`` for a VAR model, ``RasterParams`` for a raster one. ``plan`` says how
        it runs (exact if None): a VAR ``RequestPlan`` from ``nextscale.accel``, or a raster ``SpeculativePlan``."""
        if params.seed is None:
            raise InvalidInputError("engine requests need an explicit seed")
        n = labels_B.numel()
        if not 1 <= n <= self.cfg.max_images_per_request:
            raise InvalidInputError(f"a request has 1..{self.cfg.max_images_per_request} images, got {n}")
        if self.raster is not None:
            units = self._raster_units(labels_B, params, plan)
        else:
            if isinstance(plan, SpeculativePlan):
                raise InvalidInputError("speculative decoding is for raster models; a VAR request takes a RequestPlan")
            plan, units = self._var_units(labels_B, params, plan)
        rid = request_id or f"req-{next(self._ids)}"
        self.scheduler.add(rid, *units)
        self.requests[rid] = _Request(
            labels_B.to(self.device), params, previews, first_image_index, time.perf_counter(), plan
        )
        return rid

    def _raster_units(
        self, labels_B: torch.Tensor, params: SamplingParams | RasterParams, plan: RequestPlan | SpeculativePlan | None
    ) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        if not isinstance(params, RasterParams):
            raise InvalidInputError(f"a raster model samples with RasterParams, got {type(params).__name__}")
        if plan is not None and not isinstance(plan, SpeculativePlan):
            raise InvalidInputError(
                f"a raster request runs exact or with a SpeculativePlan, got {type(plan).__name__} (a VAR plan)"
            )
        if labels_B.ndim != 1:
            raise InvalidInputError(f"labels must be a 1-D tensor, got shape {tuple(labels_B.shape)}")
        self.gpt.check_labels(labels_B)
        return raster_units(params, labels_B.numel(), self.gpt.cfg.seq_len, plan.window if plan else 1)

    def _var_units(
        self, labels_B: torch.Tensor, params: SamplingParams | RasterParams, plan: RequestPlan | None
    ) -> tuple[RequestPlan, tuple[int, tuple[int, ...], tuple[int, ...]]]:
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(f"a VAR model samples with SamplingParams, got {type(params).__name__}")
        n = labels_B.numel()
        params.check_vocab(self.var.V)
        self.var.check_labels(labels_B)
        plan = plan or RequestPlan.exact(self.var.scales.num_scales)
        if len(plan.steps) != self.var.scales.num_scales:
            raise InvalidInputError(f"plan has {len(plan.steps)} steps for {self.var.scales.num_scales} scales")
        if plan.uses_refiner and self.refiner is None:
            raise InvalidInputError("the plan hands scales to a refiner (code), but this engine was built without one")
        # One scheduler unit per scale a transformer runs; its cost is rows x the tokens its plan computes (a
        # hand-off scale recomputes every earlier scale on the new model: CoDe's prefix pass).
        run = plan.run_scales
        ends = self.var.scales.begin_ends
        tokens = tuple(
            ends[si][1]
            if k and plan.steps[run[k - 1]].model != plan.steps[si].model
            else math.ceil((ends[si][1] - ends[si][0]) * plan.steps[si].tokens_fraction)
            for k, si in enumerate(run)
        )
        # A compressed cache (scalekv, hack) packs its short per-layer caches into fewer pool rows.
        return plan, (self._pool_rows(plan, n), tokens, tuple(plan.rows(si, n) for si in run))

    def _pool_rows(self, plan: RequestPlan, num_images: int) -> int:
        rows = plan.kv_rows(num_images)
        if not plan.compresses_kv:
            return rows
        return compact_rows(rows, self._kv_caps(plan), self.var.scales.seq_len)

    def _kv_caps(self, plan: RequestPlan) -> tuple[int, ...]:
        return plan.kv_capacity(self.var.scales.token_counts(), self.var.depth)

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
        events, job = self._raster_iteration(out) if self.raster is not None else self._var_iteration(out)
        if job is not None:
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

    def _var_iteration(self, out: SchedulerOutput) -> tuple[list[ScaleEvent], _Decode | None]:
        """Advance the scheduled VAR requests one scale each; an event per request, the finished ones' decode."""
        units = [self.requests[rid].state for rid in out.units]
        results = self.runner.execute([u for u in units if isinstance(u, Generation)])
        finished = set(self.scheduler.update(out))
        events, done = [], []
        for rid, res in zip(out.units, results):
            req = self.requests[rid]
            ev = ScaleEvent(rid, res.si, res.num_scales, finished=rid in finished)
            if ev.finished:
                assert req.state is not None
                ev.tokens = req.state.tokens
                req.state.release()
                del self.requests[rid]
                done.append((ev, res.f_hat_BChw))
            else:
                if req.previews:
                    ev.preview = self.decode(res.f_hat_BChw)
                events.append(ev)
        if not done:
            return events, None
        f_hat = torch.cat([f for _, f in done]) if len(done) > 1 else done[0][1]
        return events, _Decode([ev for ev, _ in done], [f.shape[0] for _, f in done], self.vae.fhat_to_img_steps(f_hat))

    def _raster_iteration(self, out: SchedulerOutput) -> tuple[list[ScaleEvent], _Decode | None]:
        """Advance the scheduled raster requests one step each (a token, or a speculative pass that fixes one or
        more). Events come when a row of the token grid completes (a preview per token would be hundreds of decoder
        passes and SSE writes per image; a pass that completes several rows gives one event), then at the end."""
        assert self.raster is not None
        states = [self._raster_state(rid) for rid in out.units]
        before = [(st.t, st.rows_done) for st in states]
        self.raster.execute(states)
        advanced = {rid: st.t - t0 for rid, st, (t0, _) in zip(out.units, states, before)}
        finished = set(self.scheduler.update(out, advanced))
        events, done = [], []
        for rid, st, (_, rows0) in zip(out.units, states, before):
            if rid in finished:
                ev = ScaleEvent(rid, st.grid - 1, st.grid, finished=True, tokens=st.tokens)
                st.release()
                del self.requests[rid]
                done.append((ev, st.tokens_BL))
            elif st.rows_done > rows0:
                ev = ScaleEvent(rid, st.rows_done - 1, st.grid)
                if self.requests[rid].previews:
                    ev.preview = row_preview(self.tokenizer, st.tokens_BL, st.rows_done)
                events.append(ev)
        if not done:
            return events, None
        tokens_BL = torch.cat([t for _, t in done]) if len(done) > 1 else done[0][1]
        return events, _Decode(
            [ev for ev, _ in done], [t.shape[0] for _, t in done], decode_steps(self.tokenizer, tokens_BL)
        )

    def _raster_state(self, rid: str) -> RasterGeneration | SpeculativeGeneration:
        state = self.requests[rid].state
        assert isinstance(state, (RasterGeneration, SpeculativeGeneration))
        return state

    def _start(self, rid: str) -> None:
        req = self.requests[rid]
        B = req.labels_B.numel()
        gens = req.params.generators(B, self.device, start=req.first_image_index)
        seq = self.scheduler.running[rid]
        start = seq.slot
        slot = self.pool.slot(start, seq.rows)
        if self.raster is not None:
            assert isinstance(req.params, RasterParams)
            if isinstance(req.plan, SpeculativePlan):
                req.state = SpeculativeGeneration(self.gpt, req.labels_B, req.params, req.plan, gens, slot)
            else:
                req.state = RasterGeneration(self.gpt, req.labels_B, req.params, gens, slot)
            return
        assert isinstance(req.params, SamplingParams) and isinstance(req.plan, RequestPlan)
        rows = req.plan.kv_rows(B)
        kv = CompactKV(slot, rows, self._kv_caps(req.plan)) if req.plan.compresses_kv else slot
        refiner_pool = self.refiner_pool
        req.state = Generation(
            self.var,
            self.vae.quantize,
            req.labels_B,
            req.params,
            gens,
            kv=kv,
            lvl_pos_1LC=self.runner.lvl_pos,
            plan=req.plan,
            refiner=self.refiner,
            refiner_kv=lambda _model, rows: refiner_pool.slot(start, rows),  # type: ignore[union-attr]
        )

    def decode(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_images(f_hat_BChw)

    # ---- offline use -----------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[tuple[torch.Tensor, SamplingParams | RasterParams]]) -> list[ScaleEvent]:
        """Run a list of requests to completion; returns their final events in input order."""
        ids = [self.add_request(labels, params) for labels, params in requests]
        done: dict[str, ScaleEvent] = {}
        while self.has_unfinished():
            done.update({e.request_id: e for e in self.step() if e.finished})
        return [done[i] for i in ids]

    def stream(
        self, labels_B: torch.Tensor, params: SamplingParams | RasterParams, previews: bool = True
    ) -> Iterator[ScaleEvent]:
        """One request's per-scale events, driving the engine (single-threaded use)."""
        rid = self.add_request(labels_B, params, previews=previews)
        while self.is_pending(rid):
            yield from (e for e in self.step() if e.request_id == rid)
