"""Iteration-level scheduling of next-scale generation (Flover's temporal fusion, vLLM/Orca's continuous
batching), in plain Python: no tensors, no model.

*Every request has a scale index ``si`` out of the same ``S`` scales; an iteration advances a set of requests by
one scale each, whatever scale each is at.* A unit (request, scale) costs ``rows * pn^2`` query tokens and
cannot be split (tokens of a scale attend to each other). Each iteration:

1. admits waiting requests first-come first-served while a contiguous range of KV-pool rows is free for them
   (every admitted row holds a full-length cache until the request ends) and fewer than ``max_running`` are
   in flight — with ``admit_gap > 0`` only once every running request is at least that many scales in, so
   arrivals start in cohorts: where a forward's cost is mostly fixed per call (small models, GPUs), each
   distinct scale in an iteration is another set of small kernels, and cohorts keep that number low;
2. schedules every *cheap* unit (scales of at most ``cheap_tokens`` tokens per row) — they cost little and give
   new requests their first preview at once;
3. adds the remaining units oldest-first while the iteration's token budget allows; the oldest is always taken,
   so a unit larger than the budget still runs (alone) and nothing starves. Oldest-first on the costly last
   scales is what bounds the latency tail. With ``first_scale_priority`` an iteration right after admissions
   skips this step (at most two iterations in a row), so a new arrival's first scale waits for one short
   iteration rather than for the costly units of older requests.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from nextscale.errors import ConfigError


@dataclass(frozen=True)
class SchedulerConfig:
    max_tokens: int = 4096  # query tokens per iteration (sum over units of rows * pn^2)
    max_rows: int = 256  # rows holding a KV cache at once (2 per image with guidance); Engine: from kv_cache_mb
    cheap_tokens: int = 16  # per-row tokens of a scale that is always scheduled (1,4,9,16 at 256 px)
    max_running: int = 64  # requests in flight at once (vLLM's max_num_seqs); the rest wait in the queue
    admit_gap: int = 0  # admit only when every running request is >= this many scales in (0 = at once)
    # When requests have just been admitted, run an iteration of cheap units only (at most two in a row), so
    # their first preview does not wait behind the costly scales of older requests. Worth it where an iteration
    # with costly units takes long (compute-bound models); it costs an extra iteration per arrival otherwise.
    first_scale_priority: bool = False

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_rows", "max_running"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.admit_gap < 0:
            raise ConfigError(f"admit_gap must be >= 0, got {self.admit_gap}")


class RowAllocator:
    """First-fit allocation of contiguous row ranges of the KV pool (free list kept sorted and coalesced).

    Contiguity matters: requests whose rows are adjacent and who are at the same scale attend in one call."""

    def __init__(self, rows: int):
        self.rows = rows
        self.free: list[tuple[int, int]] = [(0, rows)]

    @property
    def free_rows(self) -> int:
        return sum(e - s for s, e in self.free)

    def allocate(self, rows: int) -> int | None:
        for i, (s, e) in enumerate(self.free):
            if e - s >= rows:
                self.free[i : i + 1] = [(s + rows, e)] if e - s > rows else []
                return s
        return None

    def release(self, start: int, rows: int) -> None:
        merged: list[tuple[int, int]] = []
        for s, e in sorted([*self.free, (start, start + rows)]):
            assert not merged or merged[-1][1] <= s, f"rows {s}..{e} released twice"
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self.free = merged


@dataclass
class SeqState:
    request_id: str
    rows: int  # KV-cache rows it holds while running
    scale_tokens: tuple[int, ...]  # query tokens per row of each unit (pn^2 per scale for the exact plan)
    order: int = 0
    si: int = 0  # the next unit
    slot: int = -1  # first KV-pool row, once admitted
    unit_rows: tuple[int, ...] = ()  # rows each unit runs (default: ``rows``; fewer at an unguided scale)

    def __post_init__(self) -> None:
        if not self.unit_rows:
            self.unit_rows = (self.rows,) * len(self.scale_tokens)
        assert len(self.unit_rows) == len(self.scale_tokens), "one row count per unit"

    @property
    def done(self) -> bool:
        return self.si >= len(self.scale_tokens)

    @property
    def next_cost(self) -> int:
        return self.unit_rows[self.si] * self.scale_tokens[self.si]


@dataclass
class SchedulerOutput:
    units: list[str] = field(default_factory=list)  # request ids advancing one scale this iteration
    admitted: list[str] = field(default_factory=list)  # newly admitted (their caches must be allocated)
    tokens: int = 0
    cheap_only: bool = False  # a first-scale-priority iteration (costly units skipped)


class Scheduler:
    # Costly units are skipped for at most this many iterations in a row, however fast requests arrive.
    MAX_CHEAP_ONLY_RUN = 2

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.waiting: deque[SeqState] = deque()
        self.running: dict[str, SeqState] = {}
        self.rows = RowAllocator(cfg.max_rows)
        self._order = itertools.count()
        self._cheap_only_run = 0  # consecutive first-scale-priority iterations so far

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def add(self, request_id: str, rows: int, scale_tokens: tuple[int, ...], unit_rows: tuple[int, ...] = ()) -> None:
        """Queue a request holding ``rows`` KV rows whose units cost ``unit_rows[i] * scale_tokens[i]`` tokens
        (a plan from the acceleration plug-ins makes some units cheaper: fewer rows or pruned tokens)."""
        if rows > self.cfg.max_rows:
            raise ValueError(f"request needs {rows} rows, more than the engine's max_rows={self.cfg.max_rows}")
        if request_id in self.running or any(s.request_id == request_id for s in self.waiting):
            raise ValueError(f"duplicate request id {request_id!r}")
        self.waiting.append(SeqState(request_id, rows, scale_tokens, next(self._order), unit_rows=unit_rows))

    def abort(self, request_id: str) -> bool:
        seq = self.running.pop(request_id, None)
        if seq is not None:
            self.rows.release(seq.slot, seq.rows)
            return True
        for s in self.waiting:
            if s.request_id == request_id:
                self.waiting.remove(s)
                return True
        return False

    @property
    def rows_in_use(self) -> int:
        return sum(s.rows for s in self.running.values())

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step contract: schedule() -> execute -> update() ------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        gap = self.cfg.admit_gap
        may_admit = gap == 0 or all(seq.si >= gap for seq in self.running.values())
        while may_admit and self.waiting and len(self.running) < self.cfg.max_running:
            start = self.rows.allocate(self.waiting[0].rows)
            if start is None:  # FCFS: the head waits for room rather than being overtaken
                break
            seq = self.waiting.popleft()
            seq.slot = start
            self.running[seq.request_id] = seq
            out.admitted.append(seq.request_id)
        by_age = sorted(self.running.values(), key=lambda s: s.order)
        cheap_only = (
            self.cfg.first_scale_priority
            and self._cheap_only_run < self.MAX_CHEAP_ONLY_RUN
            and any(seq.si == 0 for seq in by_age)
        )
        heavy = []
        for seq in by_age:
            if seq.scale_tokens[seq.si] <= self.cfg.cheap_tokens or (cheap_only and seq.si == 0):
                out.units.append(seq.request_id)
                out.tokens += seq.next_cost
            else:
                heavy.append(seq)
        for seq in [] if cheap_only else heavy:
            if out.tokens + seq.next_cost <= self.cfg.max_tokens or not out.units:
                out.units.append(seq.request_id)
                out.tokens += seq.next_cost
        out.cheap_only = cheap_only
        self._cheap_only_run = self._cheap_only_run + 1 if cheap_only else 0
        return out

    def update(self, out: SchedulerOutput, advanced: Mapping[str, int] | None = None) -> list[str]:
        """Advance the scheduled units; returns the requests that finished (and were released). ``advanced``: units
        a request completed in its step where that is not one (a speculative pass fixes one or more tokens)."""
        finished = []
        for rid in out.units:
            seq = self.running.get(rid)
            if seq is None:  # aborted while its unit was running
                continue
            step = 1 if advanced is None else advanced.get(rid, 1)
            if step < 1:
                raise ValueError(f"request {rid!r} advanced {step} units; a step completes at least one")
            seq.si += step
            if seq.done:
                del self.running[rid]
                self.rows.release(seq.slot, seq.rows)
                finished.append(rid)
        return finished

    def check_integrity(self) -> None:
        assert self.rows_in_use <= self.cfg.max_rows, f"{self.rows_in_use} rows > budget {self.cfg.max_rows}"
        assert len(self.running) <= self.cfg.max_running, f"{len(self.running)} running > {self.cfg.max_running}"
        waiting_ids = {s.request_id for s in self.waiting}
        assert not waiting_ids & set(self.running), "a request is both waiting and running"
        assert len(waiting_ids) == len(self.waiting), "duplicate waiting request"
        for seq in self.running.values():
            assert 0 <= seq.si < len(seq.scale_tokens), f"{seq.request_id} at scale {seq.si}"
        owned = sorted((s.slot, s.slot + s.rows) for s in self.running.values())
        cur = 0
        for s, e in sorted(owned + self.rows.free):
            assert s == cur, f"KV rows {min(s, cur)}..{max(s, cur)} lost or owned twice"
            cur = e
        assert cur == self.cfg.max_rows, f"rows cover {cur} of {self.cfg.max_rows}"
