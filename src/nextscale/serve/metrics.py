"""Prometheus metrics of the server (one registry per app, so tests and several apps never collide), and the
completion rate that ``Retry-After`` is estimated from."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("nextscale_queue_depth", "requests waiting to start", registry=r)
        self.running = Gauge("nextscale_running_requests", "requests being generated", registry=r)
        self.requests = Counter("nextscale_requests_total", "finished requests by outcome", ["status"], registry=r)
        self.by_quality = Counter(
            "nextscale_requests_by_quality_total", "accepted requests by their quality level", ["quality"], registry=r
        )
        self.images = Counter("nextscale_images_generated_total", "images generated", registry=r)
        self.images_per_s = Gauge("nextscale_images_per_second", "images per second over the last minute", registry=r)
        self.latency = Histogram(
            "nextscale_request_latency_seconds", "submit to final image", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttfp = Histogram(
            "nextscale_time_to_first_preview_seconds", "submit to first scale", buckets=LATENCY_BUCKETS, registry=r
        )
        self.iter_tokens = Histogram(
            "nextscale_tokens_per_iteration",
            "query tokens fused into one iteration",
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384),
            registry=r,
        )
        self.iter_seconds = Histogram(
            "nextscale_iteration_seconds", "duration of one engine iteration", buckets=LATENCY_BUCKETS, registry=r
        )
        self._done: deque[tuple[float, int]] = deque()

    def set_queue(self, queued: int, running: int) -> None:
        self.queue_depth.set(queued)
        self.running.set(running)

    def iteration(self, seconds: float, tokens: int) -> None:
        self.iter_seconds.observe(seconds)
        self.iter_tokens.observe(tokens)

    def finished(self, images: int, latency: float) -> None:
        self.requests.labels(status="ok").inc()
        self.images.inc(images)
        self.latency.observe(latency)
        now = time.monotonic()
        self._done.append((now, images))
        while self._done and self._done[0][0] < now - 60:
            self._done.popleft()
        self.images_per_s.set(self.throughput())

    def throughput(self) -> float:
        if len(self._done) < 2:
            return 0.0
        span = max(self._done[-1][0] - self._done[0][0], 1e-3)
        return sum(n for _, n in self._done) / span

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Retry-After, in whole seconds: never "retry now" (a client would hammer a full queue), never more than a minute
# (the measured rate is recent, the queue's future is not). Before any request has finished there is no rate:
# the fallback is a few seconds, about what the bundled demo takes per queue of small requests on a 2-core CPU.
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S, RETRY_AFTER_FALLBACK_S = 1, 60, 5


class CompletionRate:
    """Images finished per second of *busy* engine time, exponentially weighted (time constant ``window`` seconds of
    busy time); ``clock`` is injectable for tests.

    Busy time, not wall time: a rate over wall time counts idle gaps between bursts as slowness (two bursts 50 s
    apart look like a few images a minute), which made Retry-After several times the real drain time. The engine
    thread calls ``busy`` before a step and ``done`` after it; both sums decay by the same factor per step, so
    their ratio follows the recent rate as the request mix changes. The handler thread reads ``per_second``."""

    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a finite number of seconds > 0, got {window!r}")
        self.window, self.clock = window, clock
        self._images = self._seconds = 0.0
        self._since: float | None = None  # start of the busy time not yet counted; None while idle
        self._lock = threading.Lock()  # written by the engine thread, read by the event loop's

    def busy(self) -> None:
        """The engine is about to step: its time counts from now (if it was idle)."""
        with self._lock:
            if self._since is None:
                self._since = self.clock()

    def done(self, images: int, busy: bool) -> None:
        """A step ended, finishing ``images`` images; ``busy``: work remains, so the time keeps counting."""
        with self._lock:
            now = self.clock()
            if self._since is not None:
                dt = max(0.0, now - self._since)
                decay = math.exp(-dt / self.window)
                self._images = self._images * decay + images
                self._seconds = self._seconds * decay + dt
            self._since = now if busy else None

    @property
    def per_second(self) -> float | None:
        """The recent rate, or None before any image has finished."""
        with self._lock:
            return self._images / self._seconds if self._images > 0 and self._seconds > 0 else None

    def retry_after(self, images_ahead: int) -> int:
        """Whole seconds until the work ahead of a rejected request (``images_ahead``: waiting and running) is
        done at the recent rate, within ``RETRY_AFTER_MIN_S``..``RETRY_AFTER_MAX_S``; the fallback before any
        image has finished."""
        rate = self.per_second
        if rate is None:
            return RETRY_AFTER_FALLBACK_S
        return int(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(images_ahead / rate))))
