"""Prometheus metrics of the server (one registry per app, so tests and several apps never collide)."""

from __future__ import annotations

import time
from collections import deque

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

    def retry_after(self, queued: int) -> float:
        """Seconds a rejected client should wait: the queue ahead of it at the recent throughput (1..60 s)."""
        rate = self.throughput()
        return 1.0 if rate <= 0 else min(60.0, max(1.0, queued / rate))

    def render(self) -> bytes:
        return generate_latest(self.registry)
