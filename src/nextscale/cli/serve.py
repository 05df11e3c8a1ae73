"""``nextscale serve``: the HTTP API, SSE previews, /metrics and the playground page on one port.

Serves either family: a VAR model (per-request ``quality`` presets, ``--accel``) or a raster (LlamaGen) model, whose
requests are batched token by token, ``quality`` picking exact (high), SJD (medium) or the lossy preset (low) and
``--speculative`` the method of quality=auto.
"""

from __future__ import annotations

import argparse
import logging
import socket
from dataclasses import fields
from pathlib import Path
from typing import Any

from nextscale.allocator import CHOICES, use_tcmalloc
from nextscale.cli.args import MEGABYTES, PORT, SECONDS, Int
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


def run(args: argparse.Namespace) -> int:
    from nextscale.serve import server  # the serve extra (uvicorn): imported only by the command that needs it

    # Settings, then the address, are checked first: a bad one is one line and exit 2, before the allocator's
    # re-execution says anything and long before a model loads. Binding is cheap, so a re-executed process simply
    # binds again (exec closes this socket).
    engine_cfg = EngineConfig(scheduler=SchedulerConfig(**given(args, SchedulerConfig)), **given(args, EngineConfig))
    sock = server.listen(args.host, args.port)
    try:
        allocator = use_tcmalloc(args.allocator)  # may replace this process: expensive work comes after it
        return _checked(args, engine_cfg, sock, allocator)
    finally:
        sock.close()


def _checked(args: argparse.Namespace, engine_cfg: EngineConfig, sock: socket.socket, allocator: str) -> int:
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
    from nextscale.serve import server
    from nextscale.serve.api import create_app
    from nextscale.serve.config import quality_plans

    pipe = load_pipeline(args, resolved=resolved)
    default = getattr(args, pipe.accel_option) if pipe.accel_option else None  # the family's own flag (checked)
    plans = quality_plans(pipe, default)
    app = create_app(Engine(pipe.engine_family(default), engine_cfg), cfg, plans=plans)
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
