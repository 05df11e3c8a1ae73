"""The HTTP edge: an OpenAI-shaped image API with streamed coarse-to-fine previews, health, metrics, playground.

Errors follow one shape, ``{"error": {"message", "type", "param"}}``: 422 for invalid bodies (naming the field
and what is allowed), 429 with ``Retry-After`` when the queue is full, 503 while not ready or draining.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from nextscale.engine.engine import Engine, EngineConfig, ScaleEvent
from nextscale.engine.request import SamplingParams
from nextscale.errors import InvalidInputError
from nextscale.images import to_pil
from nextscale.labels import resolve_label
from nextscale.serve.async_engine import AsyncEngine, Handle, QueueFull, ShuttingDown
from nextscale.serve.metrics import ServerMetrics
from nextscale.serve.protocol import ImageGenerationRequest


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "nextscale"
    max_queue: int = 64  # requests waiting to start before new ones get 429
    max_images_per_request: int = 8
    drain_timeout: float = 60.0
    engine: EngineConfig = field(default_factory=EngineConfig)


def error(status: int, message: str, kind: str, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def png_b64(images_BChw: torch.Tensor) -> list[str]:
    out = []
    for im in to_pil(images_BChw):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def preview_scales(num_scales: int, partial_images: int | None) -> set[int]:
    """Which scales' partial images to stream: all but the last by default, else ``k`` spread evenly."""
    inner = list(range(num_scales - 1))
    if partial_images is None or partial_images >= len(inner):
        return set(inner)
    if partial_images <= 0:
        return set()
    step = len(inner) / partial_images
    return {inner[min(len(inner) - 1, round((i + 1) * step) - 1)] for i in range(partial_images)}


async def next_event(handle: Handle) -> ScaleEvent:
    """The request's next per-scale event; re-raises an error the engine reported for it."""
    item = await handle.events.get()
    if isinstance(item, Exception):
        raise item
    return item


def create_app(engine: Engine, cfg: ServerConfig | None = None, warmup: bool = True) -> FastAPI:
    cfg = cfg or ServerConfig()
    metrics = ServerMetrics()
    bridge = AsyncEngine(engine, metrics, cfg.max_queue)
    var = engine.var
    state = {"ready": False}
    names = var.cfg.class_names
    size = engine.vae.cfg.image_size

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge.start(asyncio.get_running_loop())
        if warmup:  # one tiny real generation before /ready says yes
            h = bridge.submit(torch.tensor([0]), SamplingParams(seed=0), previews=False)
            while not (await next_event(h)).finished:
                pass
        state["ready"] = True
        yield
        state["ready"] = False
        await bridge.shutdown(cfg.drain_timeout)

    app = FastAPI(title="nextscale", version="0.1.0", lifespan=lifespan)
    app.state.bridge, app.state.metrics = bridge, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            allowed = ", ".join(ImageGenerationRequest.model_fields)
            msg = f"unknown field {param!r}; allowed fields: {allowed}"
        elif first.get("type") == "json_invalid":
            msg, param = "request body is not valid JSON", None
        elif param:
            msg = f"{param}: {msg}"
        return error(422, msg, "invalid_request_error", param)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state["ready"] and bridge.accepting:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": 0, "owned_by": "nextscale",
            "image_size": size, "num_scales": len(var.cfg.patch_nums), "num_classes": var.num_classes,
            "classes": list(names) if names else [str(i) for i in range(var.num_classes)],
            "max_images_per_request": cfg.max_images_per_request}]}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return resources.files("nextscale.serve").joinpath("static/playground.html").read_text()

    @app.post("/v1/images/generations", response_model=None)
    async def generate(body: ImageGenerationRequest, request: Request) -> Response:
        try:
            label, params = _validate(body)
        except InvalidInputError as e:
            return error(422, str(e), "invalid_request_error", getattr(e, "param", None))
        if not state["ready"]:
            return error(503, "server is starting up", "unavailable")
        previews = preview_scales(len(var.cfg.patch_nums), body.partial_images) if body.stream else set()
        labels = torch.full((body.n,), label, dtype=torch.long)
        try:
            handle = bridge.submit(labels, params, previews=bool(previews))
        except QueueFull as e:
            metrics.requests.labels(status="rejected").inc()
            return error(429, f"too many requests waiting (max_queue={cfg.max_queue}); retry later", "overloaded",
                         headers={"Retry-After": str(round(e.retry_after))})
        except ShuttingDown:
            return error(503, "server is shutting down", "unavailable")
        tag = names[label] if names and label < len(names) else str(label)
        if body.stream:
            return StreamingResponse(_sse(handle, previews, tag, params), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(handle, request, tag, params)

    def _validate(body: ImageGenerationRequest) -> tuple[int, SamplingParams]:
        def bad(param: str, message: str) -> InvalidInputError:
            e = InvalidInputError(message)
            e.param = param  # type: ignore[attr-defined]
            return e

        if body.n > cfg.max_images_per_request:
            raise bad("n", f"n={body.n} is too large: allowed 1..{cfg.max_images_per_request}")
        if body.size is not None and body.size != f"{size}x{size}":
            raise bad("size", f"size {body.size!r} is not supported: this model makes {size}x{size} images")
        if body.model is not None and body.model != cfg.model_name:
            raise bad("model", f"unknown model {body.model!r}; this server serves {cfg.model_name!r}")
        if body.top_k > var.V:
            raise bad("top_k", f"top_k={body.top_k} exceeds the codebook size {var.V} (0..{var.V})")
        try:
            label = resolve_label(body.label, var.num_classes, names)
        except InvalidInputError as e:
            raise bad("class_label" if body.class_label is not None else "prompt", str(e)) from None
        seed = secrets.randbits(63) if body.seed is None else body.seed
        return label, SamplingParams(cfg=body.cfg, top_k=body.top_k, top_p=body.top_p, more_smooth=body.more_smooth,
                                     seed=seed)

    async def _complete(handle: Handle, request: Request, tag: str, params: SamplingParams) -> Response:
        async def wait_final() -> ScaleEvent:
            while not (ev := await next_event(handle)).finished:
                pass
            return ev

        async def disconnected() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        final_task, gone_task = asyncio.ensure_future(wait_final()), asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({final_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        gone_task.cancel()
        if final_task not in done:
            final_task.cancel()
            bridge.abort(handle.request_id)
            return error(499, "client disconnected", "cancelled")
        try:
            final = final_task.result()
        except Exception as e:  # the engine reported a failure for this request
            return error(500, f"generation failed: {e}", "server_error")
        assert final.images is not None
        b64 = await asyncio.to_thread(png_b64, final.images)
        tokens = sum(t.numel() for t in final.tokens)
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": b, "revised_prompt": tag, "seed": params.seed} for b in b64],
                             "usage": {"images": len(b64), "tokens": tokens}})

    async def _sse(handle: Handle, previews: set[int], tag: str, params: SamplingParams) -> AsyncIterator[bytes]:
        def event(kind: str, payload: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()

        finished = False
        partial_index = 0
        try:
            while not finished:
                try:
                    ev = await next_event(handle)
                except Exception as e:  # surfaced to the client as an SSE error event
                    yield event("error", {"message": f"generation failed: {e}"})
                    return
                finished = ev.finished
                common = {"created_at": int(time.time()), "size": f"{size}x{size}", "output_format": "png",
                          "revised_prompt": tag, "seed": params.seed, "scale": ev.si, "num_scales": ev.num_scales}
                if ev.preview is not None and ev.si in previews:
                    for i, b in enumerate(await asyncio.to_thread(png_b64, ev.preview)):
                        yield event("image_generation.partial_image",
                                    {**common, "b64_json": b, "partial_image_index": partial_index, "image_index": i})
                    partial_index += 1
                if finished:
                    assert ev.images is not None
                    for i, b in enumerate(await asyncio.to_thread(png_b64, ev.images)):
                        yield event("image_generation.completed", {**common, "b64_json": b, "image_index": i})
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:  # client went away mid-stream: free its capacity now
                bridge.abort(handle.request_id)

    return app
