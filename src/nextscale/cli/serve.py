"""``nextscale serve``: the HTTP API, SSE previews, /metrics and the playground page on one port."""

from __future__ import annotations

import argparse
import logging

from nextscale.allocator import CHOICES, use_tcmalloc
from nextscale.cli.common import add_model_args, load_pipeline

log = logging.getLogger("nextscale")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-shaped API + playground at /)")
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="model id reported by /v1/models (default: the folder name)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting to start before new ones get HTTP 429 (default: 64)")
    s.add_argument("--max-images", type=int, default=8, help="largest n per request (default: 8)")
    s.add_argument("--max-running", type=int, default=64, help="requests generated concurrently (default: 64)")
    s.add_argument("--max-tokens-per-iter", type=int, default=4096,
                   help="query tokens fused into one engine iteration (default: 4096)")
    s.add_argument("--admit-gap", type=int, default=0,
                   help="start waiting requests only when every running one is this many scales in (cohorts; "
                        "helps small models whose iterations cost mostly per-kernel overhead; default: 0)")
    s.add_argument("--first-scale-priority", action="store_true",
                   help="right after new requests are admitted, run an iteration of cheap early scales only, so their "
                        "first preview does not wait behind costly late scales (for large, compute-bound models; "
                        "pair with a --max-tokens-per-iter of about two last-scale units)")
    s.add_argument("--kv-cache-mb", type=float, default=4096.0, help="memory for KV caches (default: 4096)")
    s.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to finish in-flight work on shutdown")
    s.add_argument("--allocator", choices=CHOICES, default="auto",
                   help="memory allocator: auto re-executes under tcmalloc when it is installed (the engine's "
                        "ever-changing shapes make glibc malloc page-fault; p99 latency down by about a third on "
                        "the demo model at 70%% load), else tunes glibc; tcmalloc requires it; system leaves malloc "
                        "alone")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    allocator = use_tcmalloc(args.allocator)  # first: it may replace this process
    import uvicorn

    from nextscale.engine.engine import Engine, EngineConfig
    from nextscale.serve.api import ServerConfig, create_app

    pipe = load_pipeline(args)
    engine_cfg = EngineConfig(max_tokens_per_iter=args.max_tokens_per_iter, kv_cache_mb=args.kv_cache_mb,
                              max_images_per_request=args.max_images, max_running_requests=args.max_running,
                              admit_gap=args.admit_gap, first_scale_priority=args.first_scale_priority)
    name = args.name or (args.model.rstrip("/").split("/")[-1] if args.model else
                         "var" if args.checkpoint else "demo-fmnist")
    cfg = ServerConfig(model_name=name, max_queue=args.max_queue, max_images_per_request=args.max_images,
                       drain_timeout=args.drain_timeout, engine=engine_cfg)
    app = create_app(Engine(pipe.transformer, pipe.vae, engine_cfg), cfg)
    log.info("serving %s on http://%s:%d (playground at /, API at /v1/images/generations; allocator %s)", name,
             args.host, args.port, allocator)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.drain_timeout)
    return 0
