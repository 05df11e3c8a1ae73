"""Serving past one process: replicas of the engine as a Ray Serve application (``nextscale serve --replicas N``).

Two deployments. ``EngineReplica`` (N replicas, or autoscaled between a minimum and a maximum) each load the model
and hold the one-process server's app — engine, quality plans, validation, its own bounded queue and 429 with
Retry-After, SSE previews, metrics — called in-process (``serve.inprocess``). ``Router`` (one replica, no CPU) is
the HTTP ingress: it forwards every request to a replica through Ray Serve's ``DeploymentHandle`` (Ray's request
router picks the less loaded of two replicas), and adds what one process cannot do alone:

- Failover. A seeded generation is deterministic, so a non-streamed request whose replica dies (``ray.kill``, a
  crash, a lost node) is sent again to another replica and the client gets the images it would have got; the router
  fixes a seed before forwarding a request that has none, so this holds for every request. A streamed request
  whose replica dies after its first event ends with an SSE ``error`` event naming the cause — resuming would
  replay events the client has already shown, and the client can retry with the same seed. Before its first byte a
  streamed request is retried like any other.
- Backpressure. Each replica takes at most ``max_running + max_queue + 1`` requests at once
  (``max_ongoing_requests``), so its engine's own queue bound still holds and a request it cannot queue gets the
  engine's 429 with its Retry-After estimate. When every replica is at that limit, requests wait in Ray Serve's
  handle queue (``max_queued_requests`` = ``--max-queue``); past that Ray raises ``BackPressureError`` and the
  router answers the same 429 with the latest Retry-After a replica gave (not Ray's 503).
- Metrics. ``/metrics`` is a merge: each replica's Prometheus text (``DeploymentHandle.broadcast``) with a
  ``replica`` label on every sample, plus the router's own counters (failovers, rejections). A scrape every few
  seconds is the infrequent control-plane call ``broadcast`` is meant for.
- ``/health`` answers for the router; ``/ready`` is 200 while at least one replica is ready.

A replica's resources come from the device: one GPU each where the cluster has GPUs, else a share of the CPUs (and
torch threads to match). Autoscaling uses Ray Serve's ``autoscaling_config`` on requests in flight per replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nextscale.errors import ConfigError

log = logging.getLogger("nextscale.serve")

APP_NAME = "nextscale"
INSTALL_HINT = "pip install 'nextscale[ray]'"
GENERATE = "/v1/images/generations"
RETRIES = 3  # replicas a non-streamed request may try when one dies under it


def _ray() -> Any:
    """``ray`` with Serve, or a one-line error naming the extra."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise ConfigError(f"--replicas needs Ray Serve, which is not installed; {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class ReplicaSettings:
    """How the application is laid out: replicas (fixed, or autoscaled between ``min_replicas`` and
    ``max_replicas`` on ``target_ongoing`` requests in flight per replica), each with ``num_gpus`` GPUs or
    ``num_cpus`` CPUs (``torch_threads`` threads); per-replica bounds from the engine's settings."""

    replicas: int = 2
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing: float | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    max_ongoing: int = 8  # requests one replica takes at once (running + queued + the one it answers 429)
    max_queued: int = 64  # requests waiting in Ray Serve's handle queue while every replica is at max_ongoing
    drain_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        lo, hi = self.min_replicas, self.max_replicas
        if (lo is None) != (hi is None):
            raise ConfigError("--min-replicas and --max-replicas go together (autoscaling between them)")
        if lo is not None and hi is not None and not 0 <= lo <= hi:
            raise ConfigError(f"autoscaling needs 0 <= --min-replicas <= --max-replicas, got {lo} and {hi}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve's options of the ``EngineReplica`` deployment."""
        actor: dict[str, Any] = {"num_gpus": self.num_gpus} if self.num_gpus else {"num_cpus": self.num_cpus}
        opts: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing,
            # the handle's queue while every replica is full, then BackPressureError (the router's 429). Requests also
            # count here for the moment between arrival and assignment, so a burst larger than this bound can be
            # refused while a replica has room: keep it at least the largest burst you expect (--max-queue).
            "max_queued_requests": max(1, self.max_queued),
            # Ray waits for a replica's requests up to this long before calling its __del__ (which drains again)
            "graceful_shutdown_timeout_s": self.drain_timeout + 5,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 60.0,  # a replica busy loading a model or generating may answer late
            "max_constructor_retry_count": 2,  # a model that cannot load fails the same way in every replica
        }
        if self.autoscaling:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas or 0, min(self.replicas, self.max_replicas or 1)),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing or max(1.0, self.max_ongoing / 2),
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts


def replica_resources(replicas: int, cluster: Mapping[str, float]) -> tuple[float, float, int]:
    """(GPUs, CPUs, torch threads) of one replica: a GPU each where the cluster has GPUs, else an equal share of the
    cluster's CPUs (at least one), with as many torch threads."""
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", os.cpu_count() or 1))
    share = max(1.0, math.floor(cpus / max(1, replicas)))
    if gpus >= 1:
        return 1.0, 0.0, int(share)
    return 0.0, share, int(share)


# ---- the replica --------------------------------------------------------------------------------------------------
class EngineReplica:
    """One engine on one model behind the one-process server's app (``serve.api.create_app``), called in-process."""

    async def __init__(self, build_app: Callable[[], Any], torch_threads: int):  # type: ignore[misc]  # Ray awaits it
        """``build_app()``: the API app over the model (``nextscale serve``'s builder with its arguments)."""
        import torch

        from nextscale.serve.inprocess import InProcessApp

        torch.set_num_threads(max(1, torch_threads))
        app = await asyncio.to_thread(build_app)  # loading the model must not block the replica's loop
        self.bridge = app.state.bridge
        self.app = InProcessApp(app)
        await self.app.start()  # the warm-up generation: the replica is ready once it returns

    async def http(
        self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Any]:
        """The app's response: ``(status, headers)``, then body chunks."""
        async for item in self.app.request(method, path, query, headers, body):
            yield item

    async def metrics(self) -> tuple[str, str]:
        """(this replica's id, its Prometheus text)."""
        from ray import serve

        rid = serve.get_replica_context().replica_id.unique_id
        text = b""
        async for item in self.app.request("GET", "/metrics", "", [], b""):
            if isinstance(item, bytes):
                text += item
        return rid, text.decode()

    async def ready(self) -> bool:
        return self.bridge.accepting

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died is restarted."""
        if not self.bridge.alive:
            raise RuntimeError("the engine thread is not running")

    async def __del__(self) -> None:
        """Graceful shutdown (Ray waited for in-flight requests first): the app's drain, then its lifespan's end."""
        app = getattr(self, "app", None)  # None: the constructor failed (Ray still calls this)
        if app is not None:
            await app.stop()


# ---- the router ---------------------------------------------------------------------------------------------------
@dataclass
class RouterStats:
    failovers: int = 0  # requests sent again after their replica died
    stream_failures: int = 0  # streams ended with an error event because their replica died
    rejected: int = 0  # 429s the router gave (every replica full)
    retry_after: int = 1  # the latest Retry-After a replica gave
    by_status: dict[int, int] = field(default_factory=dict)


def _replica_gone(e: BaseException) -> bool:
    """Whether ``e`` says the replica serving a call is gone (killed, crashed, its node lost)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError))


def pinned_seed(body: bytes) -> bytes:
    """The request body with a seed fixed where it has none (so that a retry elsewhere gives the same images);
    anything that is not a JSON object goes on unchanged (the replica answers it)."""
    try:
        obj = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return body
    if not isinstance(obj, dict) or obj.get("seed") is not None:
        return body
    obj["seed"] = secrets.randbits(63)
    return json.dumps(obj).encode()


def merge_metrics(parts: list[tuple[str, str]], own: str = "") -> str:
    """Replicas' Prometheus texts as one exposition, each sample labelled with its ``replica`` (prometheus_client's
    parser; families keep one HELP/TYPE), followed by the router's own text."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for rid, text in parts:
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, fam)
            samples = [s._replace(labels={**s.labels, "replica": rid}) for s in fam.samples]
            if merged is fam:
                fam.samples = samples
            else:
                merged.samples.extend(samples)
    lines: list[str] = []
    for fam in families.values():
        lines.append(f"# HELP {fam.name} {fam.documentation}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for s in fam.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
            lines.append(f"{s.name}{{{labels}}} {_number(s.value)}")
    return "\n".join(lines) + "\n" + own


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if v != int(v) or abs(v) >= 1e15 else str(int(v))


class Router:
    """The ingress: forwards requests to the replicas with failover, backpressure as 429, merged metrics."""

    def __init__(self, replicas: Any):
        self.replicas = replicas
        self.stream = replicas.options(stream=True)
        self.stats = RouterStats()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        path = request.url.path
        if request.method == "GET" and path == "/health":
            return JSONResponse({"status": "ok"})
        if request.method == "GET" and path == "/ready":
            ok = await self._any_ready()
            return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)
        if request.method == "GET" and path == "/metrics":
            parts = await self.replicas.broadcast("metrics").results_async(timeout_s=10, return_exceptions=True)
            texts = [p for p in parts if isinstance(p, tuple)]  # a replica that is restarting is left out
            return Response(merge_metrics(texts, self._own_metrics()), media_type="text/plain; version=0.0.4")
        body = await request.body()
        if request.method == "POST" and path == GENERATE:
            body = pinned_seed(body)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("content-length", "host")]
        args = (request.method, path, request.url.query, headers, body)
        return await self._forward(args)

    async def _any_ready(self) -> bool:
        try:
            answers = await self.replicas.broadcast("ready").results_async(timeout_s=5, return_exceptions=True)
        except Exception:  # no replica yet, or all restarting
            return False
        return any(a is True for a in answers)

    async def _forward(self, args: tuple) -> Any:
        from ray.serve.exceptions import BackPressureError
        from starlette.responses import Response, StreamingResponse

        from nextscale.serve.api import error

        last: BaseException | None = None
        for attempt in range(RETRIES):
            gen = self.stream.http.remote(*args)
            try:
                status, headers = await gen.__anext__()
                if status == 429:
                    self.stats.retry_after = _retry_after(headers, self.stats.retry_after)
                if dict((k.lower(), v) for k, v in headers).get("content-type", "").startswith("text/event-stream"):
                    self._count(status)
                    return StreamingResponse(self._relay(gen), status_code=status, headers=_plain(headers))
                chunks = [c async for c in gen]
            except BackPressureError:
                self.stats.rejected += 1
                self._count(429)
                return error(
                    429,
                    f"every replica is full; retry in {self.stats.retry_after}s",
                    "overloaded",
                    headers={"Retry-After": str(self.stats.retry_after)},
                )
            except Exception as e:
                if not _replica_gone(e):
                    raise
                last = e
                self.stats.failovers += 1
                log.warning("replica lost under a request (%s); sending it to another (attempt %d)", e, attempt + 2)
                continue
            self._count(status)
            return Response(b"".join(chunks), status_code=status, headers=_plain(headers))
        self._count(503)
        return error(503, f"no replica could finish the request: {last}", "unavailable")

    async def _relay(self, gen: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in gen:
                yield chunk
        except Exception as e:
            if not _replica_gone(e):
                raise
            self.stats.stream_failures += 1
            why = f"generation failed: its replica stopped ({type(e).__name__}); retry with the same seed"
            yield f"event: error\ndata: {json.dumps({'type': 'error', 'message': why})}\n\n".encode()
        finally:
            gen.cancel()  # the client went away (or the stream ended): the replica's request is cancelled

    def _count(self, status: int) -> None:
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1

    def _own_metrics(self) -> str:
        s = self.stats
        lines = [
            "# HELP nextscale_router_failovers_total Requests sent to another replica after theirs died.",
            "# TYPE nextscale_router_failovers_total counter",
            f"nextscale_router_failovers_total {s.failovers}",
            "# HELP nextscale_router_stream_failures_total Streams ended with an error event: their replica died.",
            "# TYPE nextscale_router_stream_failures_total counter",
            f"nextscale_router_stream_failures_total {s.stream_failures}",
            "# HELP nextscale_router_rejected_total Requests answered 429 by the router: every replica was full.",
            "# TYPE nextscale_router_rejected_total counter",
            f"nextscale_router_rejected_total {s.rejected}",
            "# HELP nextscale_router_responses_total Responses by HTTP status.",
            "# TYPE nextscale_router_responses_total counter",
            *(f'nextscale_router_responses_total{{status="{k}"}} {v}' for k, v in sorted(s.by_status.items())),
        ]
        return "\n".join(lines) + "\n"


def _plain(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Response headers to pass on (the length is the router's response's own)."""
    return {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}


def _retry_after(headers: list[tuple[str, str]], default: int) -> int:
    for k, v in headers:
        if k.lower() == "retry-after" and v.isdigit():
            return int(v)
    return default


# ---- the application ----------------------------------------------------------------------------------------------
def application(build_app: Callable[[], Any], settings: ReplicaSettings) -> Any:
    """The Ray Serve application: the router in front of the engine replicas, each holding ``build_app()``."""
    _ray()
    from ray import serve

    replica = serve.deployment(name="EngineReplica", **settings.deployment_options())(EngineReplica)
    router = serve.deployment(name="Router", num_replicas=1, ray_actor_options={"num_cpus": 0})(Router)
    return router.bind(replica.bind(build_app, settings.torch_threads))


@dataclass
class Running:
    """A started application: ``stop()`` shuts it down (draining), and Ray too when ``started_ray``."""

    port: int
    started_ray: bool
    stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        ray = _ray()
        from ray import serve

        serve.delete(APP_NAME)  # replicas finish their requests (graceful shutdown) before this returns
        serve.shutdown()
        if self.started_ray:
            ray.shutdown()
        self.stopped.set()


# Ray Serve gives its HTTP proxy 5 s to answer a readiness check and marks it dead after three misses: on a busy
# machine (two cores loading models) that kills the proxy before it serves. A local cluster started here is more
# patient (the processes inherit these; a joined cluster keeps its own settings, and an explicit value wins).
PATIENT_RAY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def _init(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address``, or start a local one ("local": never one that happens to run here)."""
    if not address:
        for key, value in PATIENT_RAY.items():
            os.environ.setdefault(key, value)
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)


def start(build_app: Callable[[], Any], settings: ReplicaSettings, host: str, port: int) -> Running:
    """Run the application on ``host``:``port`` of the Ray cluster this process is connected to; returns once every
    replica is ready."""
    _ray()
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(build_app, settings), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:  # Ray's says only which deployment failed; the cause is in its status message
        status = serve.status().applications.get(APP_NAME)
        message = status.deployments["EngineReplica"].message if status else ""
        cause = next((ln for ln in reversed(message.splitlines()) if ln.strip()), str(e))
        raise ConfigError(f"the replicas failed to start: {cause.strip()}") from None
    return Running(port, started_ray=False)


def run(build_app: Callable[[], Any], settings: ReplicaSettings, host: str, port: int, address: str | None) -> int:
    """``nextscale serve --replicas N``: serve until SIGTERM or SIGINT, then drain and exit 0."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        _init(ray, address)
    gpus, cpus, threads = replica_resources(settings.max_replicas or settings.replicas, ray.cluster_resources())
    settings = ReplicaSettings(
        **{**settings.__dict__, "num_gpus": gpus, "num_cpus": cpus, "torch_threads": threads}  # from the device
    )
    # Ours, not Ray's (ray.init installs one that exits with status 15): a signal while the replicas start stops
    # the application as soon as it is up.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    running = start(build_app, settings, host, port)
    running.started_ray = started  # stop() shuts down the cluster this command started
    log.info(
        "serving %d replica(s) (%s each) on http://%s:%d through Ray Serve (playground at /)",
        settings.replicas,
        f"{gpus:g} GPU" if gpus else f"{cpus:g} CPU, {threads} torch thread(s)",
        host,
        port,
    )
    stop.wait()
    log.info("draining: replicas finish their requests (up to %gs)", settings.drain_timeout)
    running.stop()
    return 0
