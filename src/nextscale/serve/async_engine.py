"""Bridge between asyncio request handlers and the engine, which runs in one dedicated thread.

Handlers ``submit`` requests and read their per-scale events from an ``asyncio.Queue``; the engine thread
owns the ``Engine`` exclusively (adds and aborts arrive as commands, so nothing races with a step) and
hands events back with ``call_soon_threadsafe``. Torch releases the GIL inside its kernels, so the event
loop keeps answering ``/health`` and ``/metrics`` while a step runs.

Shutdown drains: ``drain`` stops taking requests, and whatever is unfinished when the drain timeout runs out is
abandoned — its handler gets ``ShuttingDown`` and answers its client with a 503 instead of a cut connection —, so
``abandoned`` says whether the drain was clean.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from nextscale.engine.engine import Engine, ScaleEvent
from nextscale.serve.metrics import CompletionRate, ServerMetrics

log = logging.getLogger("nextscale.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after}s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """Not accepting requests (draining); posted to a request's handler when the drain abandons it."""


@dataclass
class Handle:
    request_id: str
    images: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    first_preview: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queue: int = 64, rate: CompletionRate | None = None):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.rate = rate or CompletionRate()  # measured here, in the engine thread; Retry-After reads it
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._handles: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepting = True
        self._ids = 0
        # The drain: its deadline (monotonic; None: not draining), the requests in flight when it began, and
        # how many it abandoned (unfinished at the deadline).
        self._deadline: float | None = None
        self.drain_started: float | None = None
        self.in_flight_at_drain = 0
        self.abandoned = 0

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="nextscale-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The engine thread is running (false before ``start`` and after ``shutdown``, or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def drain(self, timeout: float) -> None:
        """Stop accepting; requests still unfinished ``timeout`` seconds from now are abandoned. A second call keeps
        the first deadline. Only sets attributes (no locks): a signal handler calls it, and the engine thread
        notices the deadline within half a second."""
        self.accepting = False
        if self._deadline is None:
            self.drain_started = time.monotonic()
            self.in_flight_at_drain = len(self._handles)
            self._deadline = self.drain_started + timeout

    async def shutdown(self, drain_timeout: float = 60.0) -> int:
        """Drain (``drain``; an earlier call's deadline stands), then stop the thread; returns how many requests
        the drain abandoned (0: every accepted request finished)."""
        self.drain(drain_timeout)
        assert self._deadline is not None
        while self._handles and time.monotonic() < self._deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._handles):  # the engine thread is stuck in a long step, or gone
            self._abandon(rid)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        return self.abandoned

    # ---- handler side ------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return sum(1 for h in self._handles.values() if not h.started)

    @property
    def running(self) -> int:
        return sum(1 for h in self._handles.values() if h.started)

    def images_ahead(self) -> int:
        """Images a new request waits behind: those queued and those running."""
        return sum(h.images for h in list(self._handles.values()))

    def submit(
        self,
        condition: Any,
        params: Any,
        previews: bool,
        plan: Any = None,
    ) -> Handle:
        if not self.accepting:
            raise ShuttingDown()
        with self._lock:
            if self.queued >= self.max_queue:
                raise QueueFull(self.rate.retry_after(self.images_ahead()))
            self._ids += 1
            handle = Handle(f"img-{self._ids}", len(condition))
            self._handles[handle.request_id] = handle
        self._commands.put(("add", (handle.request_id, condition, params, previews, plan)))
        self._wake.set()
        self.metrics.set_queue(self.queued, self.running)
        return handle

    def abort(self, request_id: str) -> None:
        """Cancel (client gone): the engine frees the request's cache before its next step."""
        if self._handles.pop(request_id, None) is not None:
            self.metrics.requests.labels(status="cancelled").inc()
            self._commands.put(("abort", request_id))
            self._wake.set()
            self.metrics.set_queue(self.queued, self.running)

    def _abandon(self, request_id: str) -> None:
        """The drain ran out of time for this request: its handler gets ``ShuttingDown``, the engine drops it.
        Either thread may call it; whichever pops the handle counts it."""
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return
        with self._lock:
            self.abandoned += 1
        self.metrics.requests.labels(status="abandoned").inc()
        self._post(request_id, ShuttingDown("the server shut down before this request finished"), handle)
        self._commands.put(("abort", request_id))

    # ---- engine thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                for rid in list(self._handles):
                    self._abandon(rid)
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            self.rate.busy()
            try:
                # new submissions or aborts pause a long final decode, so they are taken in at once
                events = self.engine.step(interrupt=lambda: not self._commands.empty())
            except Exception as e:  # one bad step must not kill the server
                log.exception("engine step failed")
                self.rate.done(0, busy=False)
                self._fail_all(e)
                continue
            self.metrics.iteration(time.perf_counter() - t0, self.engine.last_iteration_tokens)
            self._mark_started()
            finished = 0
            for ev in events:
                finished += self._deliver(ev)
            self.rate.done(finished, busy=self.engine.has_unfinished())
            self.metrics.set_queue(self.queued, self.running)

    def _mark_started(self) -> None:
        """A request is running (not queued) once the engine admits it: a raster request's first event comes only
        with its first row of tokens, and counting it as queued until then would turn arrivals away (429) early."""
        for rid, handle in list(self._handles.items()):
            if not handle.started and self.engine.is_running(rid):
                handle.started = True

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rid, labels, params, previews, plan = arg
                if rid not in self._handles:  # aborted before it reached the engine
                    continue
                try:
                    self.engine.add_request(labels, params, request_id=rid, previews=previews, plan=plan)
                except ValueError as e:
                    self._post(rid, e)
            elif kind == "abort" and self.engine.is_pending(arg):
                self.engine.abort(arg)

    def _deliver(self, ev: ScaleEvent) -> int:
        """Hands ``ev`` to its handler; returns the images it finished (for the completion rate)."""
        handle = self._handles.get(ev.request_id)
        if handle is None:
            return 0
        now = time.perf_counter()
        if not handle.started:
            handle.started = True
        if handle.first_preview is None:
            handle.first_preview = now
            self.metrics.ttfp.observe(now - handle.submitted)
        if ev.finished:
            self._handles.pop(ev.request_id, None)
            self.metrics.finished(handle.images, now - handle.submitted)
        self._post(ev.request_id, ev, handle)
        return handle.images if ev.finished else 0

    def _post(self, rid: str, item: Any, handle: Handle | None = None) -> None:
        handle = handle or self._handles.pop(rid, None)
        if handle is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(handle.events.put_nowait, item)

    def _fail_all(self, err: Exception) -> None:
        for rid in list(self._handles):
            if rid in self.engine.requests:
                self.engine.abort(rid)
            self._post(rid, err)
            self._handles.pop(rid, None)
            self.metrics.requests.labels(status="error").inc()
