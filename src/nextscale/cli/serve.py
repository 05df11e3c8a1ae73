"""``nextscale serve``: the HTTP API, SSE previews, /metrics and the playground page on one port.

Serves either family: a VAR model (per-request ``quality`` presets, ``--accel``) or a raster (LlamaGen) model, whose
requests are batched token by token, ``quality`` picking exact (high), SJD (medium) or the lossy preset (low) and
``--speculative`` the method of quality=auto.
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
from dataclasses import fields
from pathlib import Path
from typing import Any

from nextscale.allocator import CHOICES, use_tcmalloc
from nextscale.cli.args import MEGABYTES, PORT, SECONDS, Float, Int
from nextscale.cli.common import add_model_args, family_flags, load_pipeline, refuse_options, resolve_model
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.scheduler import SchedulerConfig
from nextscale.serve.config import ServerConfig

log = logging.getLogger("nextscale")
# Defaults come from the dataclasses (flags default to None: "not given"); these instances only print them.
ENGINE, SERVER = EngineConfig(), ServerConfig()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-shaped API + playground at /)")
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=PORT, default=8000, help="TCP port (0: any free port; default: 8000)")
    s.add_argument("--name", default=None, help="model id reported by /v1/models (default: the folder name)")
    s.add_argument(
        "--max-queue",
        type=Int(1, 1_000_000),
        help=f"requests waiting to start before new ones get HTTP 429 (default: {SERVER.max_queue})",
    )
    s.add_argument(
        "--max-images",
        type=Int(1, 4096),
        dest="max_images_per_request",
        metavar="MAX_IMAGES",
        help=f"largest n per request (default: {ENGINE.max_images_per_request})",
    )
    s.add_argument(
        "--max-running",
        type=Int(1, 65_536),
        help=f"requests generated concurrently (default: {ENGINE.scheduler.max_running})",
    )
    s.add_argument(
        "--max-tokens-per-iter",
        type=Int(1, 2**31 - 1),
        dest="max_tokens",
        metavar="MAX_TOKENS_PER_ITER",
        help=f"query tokens fused into one engine iteration (default: {ENGINE.scheduler.max_tokens})",
    )
    s.add_argument(
        "--admit-gap",
        type=Int(0, 4096),
        help="start waiting requests only when every running one is this many scales in (cohorts; "
        "helps small models whose iterations cost mostly per-kernel overhead; default: "
        f"{ENGINE.scheduler.admit_gap})",
    )
    s.add_argument(
        "--first-scale-priority",
        action="store_true",
        default=None,
        help="right after new requests are admitted, run an iteration of cheap early scales only, so their "
        "first preview does not wait behind costly late scales (for large, compute-bound models; "
        "pair with a --max-tokens-per-iter of about two last-scale units)",
    )
    s.add_argument("--kv-cache-mb", type=MEGABYTES, help=f"memory for KV caches (default: {ENGINE.kv_cache_mb:g})")
    s.add_argument(
        "--drain-timeout",
        type=SECONDS,
        help=f"seconds to finish in-flight work on shutdown (default: {SERVER.drain_timeout:g})",
    )
    s.add_argument(
        "--accel",
        action="append",
        metavar="SPEC",
        default=None,
        help="acceleration of requests with quality=auto (the default): a preset (exact, balanced, fast) or plug-in "
        "specs, repeatable; quality=high/medium/low pick the exact/balanced/fast presets per request",
    )
    s.add_argument(
        "--speculative",
        metavar="SPEC",
        default=None,
        help="raster models: speculative decoding of requests with quality=auto (the default): exact, a preset "
        "(balanced, fast) or a spec such as sjd:window=16; quality=high/medium/low pick exact/balanced/fast",
    )
    r = p.add_argument_group("more than one process (Ray Serve; pip install 'nextscale[ray]')")
    r.add_argument(
        "--replicas",
        type=Int(1, 4096),
        default=None,
        help="engine replicas behind one HTTP endpoint, each with its own engine on one GPU or a share of the "
        "CPUs, with failover (default: one process, no Ray)",
    )
    r.add_argument("--min-replicas", type=Int(0, 4096), help="autoscale: fewest replicas (with --max-replicas)")
    r.add_argument("--max-replicas", type=Int(1, 4096), help="autoscale: most replicas (with --min-replicas)")
    r.add_argument(
        "--target-requests",
        type=Float(0.0, 1e6, lo_open=True),
        dest="target_ongoing",
        help="autoscale: requests in flight per replica that Ray Serve aims for (default: half a replica's limit)",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start a local one",
    )
    s.add_argument(
        "--allocator",
        choices=CHOICES,
        default="auto",
        help="memory allocator: auto re-executes under tcmalloc when it is installed (the engine's "
        "ever-changing shapes make glibc malloc page-fault; p99 latency down by about a third on "
        "the demo model at 70%% load), else tunes glibc; tcmalloc requires it; system leaves malloc "
        "alone",
    )
    p.set_defaults(func=run)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of dataclass ``cls`` set on the command line (flag dests are field names); others keep defaults."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(scheduler=SchedulerConfig(**given(args, SchedulerConfig)), **given(args, EngineConfig))


def run(args: argparse.Namespace) -> int:
    from nextscale.serve import server  # the serve extra (uvicorn): imported only by the command that needs it

    # Settings, then the address, are checked first: a bad one is one line and exit 2, before the allocator's
    # re-execution says anything and long before a model loads. Binding is cheap, so a re-executed process simply
    # binds again (exec closes this socket).
    engine_cfg = engine_config(args)
    sock = server.listen(args.host, args.port)
    try:
        # may replace this process: expensive work comes after it (replicas run in Ray's worker processes)
        allocator = "ray workers" if _replicated(args) else use_tcmalloc(args.allocator)
        return _checked(args, engine_cfg, sock, allocator)
    finally:
        sock.close()


def _checked(args: argparse.Namespace, engine_cfg: EngineConfig, sock: socket.socket, allocator: str) -> int:
    if _replicated(args):
        return _replicas(args, engine_cfg, sock)
    from nextscale.serve import server

    app = build_app(args, engine_cfg)
    cfg = app.state.server_config
    host, port = sock.getsockname()[:2]
    log.info(
        "serving %s on http://%s:%d (playground at /, API at /v1/images/generations; allocator %s)",
        cfg.model_name,
        f"[{host}]" if ":" in host else host,
        port,
        allocator,
    )
    # 0 after a clean drain; non-zero when the drain timed out and abandoned requests (server.serve)
    return server.serve(app, sock, cfg.drain_timeout)


def build_app(args: argparse.Namespace, engine_cfg: EngineConfig | None = None) -> Any:
    """The API app over the model ``args`` name, with its engine and quality plans: what one process serves, and what
    each Ray Serve replica holds (``serve.replicas``)."""
    from nextscale.serve.api import create_app
    from nextscale.serve.config import quality_plans

    engine_cfg = engine_cfg or engine_config(args)
    resolved = resolve_model(args)
    name = args.name or (
        args.model.rstrip("/").split("/")[-1]
        if args.model
        else Path(args.checkpoint).stem
        if args.checkpoint
        else "demo-fmnist"
    )
    cfg = ServerConfig(model_name=name, **given(args, ServerConfig))
    refuse_options(args, resolved[0], family_flags("accel_option"))  # the default plan of quality=auto
    pipe = load_pipeline(args, resolved=resolved)
    default = getattr(args, pipe.accel_option) if pipe.accel_option else None  # the family's own flag (checked)
    plans = quality_plans(pipe, default)
    app = create_app(Engine(pipe.engine_family(default), engine_cfg), cfg, plans=plans)
    app.state.server_config = cfg
    return app


def _replicated(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("replicas", "min_replicas", "max_replicas"))


def _replicas(args: argparse.Namespace, engine_cfg: EngineConfig, sock: socket.socket) -> int:
    """``--replicas N``: the Ray Serve application on the address ``sock`` was bound to (checked free; Ray's proxy
    binds it once the socket is closed)."""
    from nextscale.serve import replicas

    cfg = ServerConfig(**given(args, ServerConfig))
    settings = replicas.ReplicaSettings(
        replicas=args.replicas or args.min_replicas or 1,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing=args.target_ongoing,
        max_ongoing=engine_cfg.scheduler.max_running + cfg.max_queue + 1,
        max_queued=cfg.max_queue,
        drain_timeout=cfg.drain_timeout,
    )
    resolve_model(args)  # a bad model name fails here, in one line, not in every replica
    host, port = sock.getsockname()[:2]
    sock.close()
    worker_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    return replicas.run(functools.partial(build_app, worker_args), settings, host, port, args.ray_address)
