"""The HTTP edge: an OpenAI-shaped image API with streamed coarse-to-fine previews, health, metrics, playground.

Both model families serve through the same API (``serve.family``): a VAR model streams a preview per scale, a
raster (LlamaGen) model one per completed row of its token grid (the rows decoded so far); ``scale`` and
``num_scales`` in the events count those steps.

Errors follow one shape, ``{"error": {"message", "type", "param"}}``: 422 for invalid bodies (naming the field
and what is allowed), 429 with ``Retry-After`` when the queue is full, 503 while not ready or draining.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from nextscale.engine.engine import Engine, ScaleEvent
from nextscale.engine.plan import RequestPlan
from nextscale.engine.speculative import SpeculativePlan
from nextscale.errors import InvalidInputError
from nextscale.images import to_pil
from nextscale.labels import resolve_label
from nextscale.serve.async_engine import AsyncEngine, Handle, QueueFull, ShuttingDown
from nextscale.serve.config import ServerConfig
from nextscale.serve.family import Params, bad_field, served_model
from nextscale.serve.metrics import ServerMetrics
from nextscale.serve.protocol import ImageGenerationRequest

log = logging.getLogger("nextscale.serve")


def error(
    status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
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


def sse_event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()


async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 in the API's error shape, naming the field and what it allows."""
    first: dict[str, Any] = next(iter(exc.errors()), {})
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field {param!r}; allowed fields: {', '.join(ImageGenerationRequest.model_fields)}"
    elif first.get("type") == "json_invalid":
        msg, param = "request body is not valid JSON", None
    elif first.get("type") == "finite_number":  # spelled as the client sent it: NaN, Infinity, -Infinity
        msg = f"{param} must be a finite number, got {json.dumps(first.get('input'), default=str)}"
    elif param:
        msg = f"{param}: {msg}"
    return error(422, msg, "invalid_request_error", param)


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def playground() -> str:
    return resources.files("nextscale.serve").joinpath("static/playground.html").read_text()


class _Server:
    """What the routes share (the engine's bridge, settings, metrics, readiness), with one method per route."""

    def __init__(
        self,
        engine: Engine,
        cfg: ServerConfig,
        warmup: bool,
        plans: Mapping[str, RequestPlan | SpeculativePlan | None],
        class_names: Sequence[str] | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
    ):
        self.cfg, self.warmup = cfg, warmup
        self.model = served_model(engine, class_names, sampling_defaults)
        want = RequestPlan if self.model.family == "var" else SpeculativePlan
        for q, plan in plans.items():
            if plan is not None and not isinstance(plan, want):
                raise InvalidInputError(
                    f"quality {q!r}: a {self.model.family} model takes {want.__name__}s, got {type(plan).__name__}"
                )
        self.plans = dict(plans)  # quality level -> plan (a missing level is the exact plan)
        self.metrics = ServerMetrics()
        self.bridge = AsyncEngine(engine, self.metrics, cfg.max_queue)
        self.max_images = engine.cfg.max_images_per_request  # the engine's limit is the API's
        self.names = self.model.class_names
        self.size = self.model.image_size
        self.is_ready = False

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self.bridge.start(asyncio.get_running_loop())
        if self.warmup:  # one tiny real generation before /ready says yes
            h = self.bridge.submit(torch.tensor([0]), self.model.warmup_params(), previews=False)
            while not (await next_event(h)).finished:
                pass
        self.is_ready = True
        yield
        self.is_ready = False
        await self.bridge.shutdown(self.cfg.drain_timeout)

    async def ready(self) -> JSONResponse:
        if self.is_ready and self.bridge.accepting:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self) -> dict[str, Any]:
        m, names = self.model, self.names
        return {
            "object": "list",
            "data": [
                {
                    "id": self.cfg.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "nextscale",
                    "family": m.family,
                    "image_size": self.size,
                    "num_scales": m.steps,  # a raster model: the rows of its token grid, one preview each
                    "num_classes": m.num_classes,
                    "classes": list(names) if names else [str(i) for i in range(m.num_classes)],
                    "max_images_per_request": self.max_images,
                }
            ],
        }

    async def generate(self, body: ImageGenerationRequest, request: Request) -> Response:
        try:
            label, params = self._validate(body)
        except InvalidInputError as e:
            return error(422, str(e), "invalid_request_error", getattr(e, "param", None))
        if not self.is_ready:
            return error(503, "server is starting up", "unavailable")
        previews = preview_scales(self.model.steps, body.partial_images) if body.stream else set()
        labels = torch.full((body.n,), label, dtype=torch.long)
        try:
            handle = self.bridge.submit(labels, params, previews=bool(previews), plan=self.plans.get(body.quality))
        except QueueFull as e:
            self.metrics.requests.labels(status="rejected").inc()
            return error(
                429,
                f"too many requests waiting (max_queue={self.cfg.max_queue}); retry later",
                "overloaded",
                headers={"Retry-After": str(round(e.retry_after))},
            )
        except ShuttingDown:
            return error(503, "server is shutting down", "unavailable")
        self.metrics.by_quality.labels(quality=body.quality).inc()
        names = self.names
        tag = names[label] if names and label < len(names) else str(label)
        if body.stream:
            return StreamingResponse(
                self._sse(handle, request, previews, tag, params),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._complete(handle, request, tag, params)

    def _validate(self, body: ImageGenerationRequest) -> tuple[int, Params]:
        size, m = self.size, self.model
        if body.n > self.max_images:
            raise bad_field("n", f"n={body.n} is too large: allowed 1..{self.max_images}")
        if body.size is not None and body.size != f"{size}x{size}":
            raise bad_field("size", f"size {body.size!r} is not supported: this model makes {size}x{size} images")
        if body.model is not None and body.model != self.cfg.model_name:
            raise bad_field("model", f"unknown model {body.model!r}; this server serves {self.cfg.model_name!r}")
        if body.top_k > m.vocab_size:
            raise bad_field("top_k", f"top_k={body.top_k} exceeds the codebook size {m.vocab_size} (0..{m.vocab_size})")
        try:
            label = resolve_label(body.label, m.num_classes, self.names)
        except InvalidInputError as e:
            raise bad_field("class_label" if body.class_label is not None else "prompt", str(e)) from None
        seed = secrets.randbits(63) if body.seed is None else body.seed
        return label, m.params(body, seed)

    async def _complete(self, handle: Handle, request: Request, tag: str, params: Params) -> Response:
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
            self.bridge.abort(handle.request_id)
            log.debug("%s: client disconnected; request cancelled", handle.request_id)
            return error(499, "client disconnected", "cancelled")
        try:
            final = final_task.result()
        except Exception as e:  # the engine reported a failure for this request
            return error(500, f"generation failed: {e}", "server_error")
        assert final.images is not None
        b64 = await asyncio.to_thread(png_b64, final.images)
        tokens = sum(t.numel() for t in final.tokens)
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [{"b64_json": b, "revised_prompt": tag, "seed": params.seed} for b in b64],
                "usage": {"images": len(b64), "tokens": tokens},
            }
        )

    async def _sse(
        self, handle: Handle, request: Request, previews: set[int], tag: str, params: Params
    ) -> AsyncIterator[bytes]:
        """The request's events, one write per scale; stops, quietly, once the client is gone.

        One write per scale, not one per image: the event loop notices a reset connection between writes only,
        and asyncio warns "socket.send() raised exception." from the sixth write into a lost one."""
        finished = failed = False
        partials = 0
        try:
            while not finished:
                try:
                    ev = await next_event(handle)
                except Exception as e:  # surfaced to the client as an SSE error event
                    failed = True
                    yield sse_event("error", {"message": f"generation failed: {e}"})
                    return
                if await request.is_disconnected():
                    return
                finished = ev.finished
                preview = ev.preview is not None and ev.si in previews
                if chunk := await self._scale_events(ev, partials if preview else None, tag, params):
                    yield chunk
                partials += preview
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:  # client gone (or the engine failed): free the request's capacity now
                self.bridge.abort(handle.request_id)
                if not failed:
                    log.debug("%s: client disconnected mid-stream; request cancelled", handle.request_id)

    async def _scale_events(self, ev: ScaleEvent, partial_index: int | None, tag: str, params: Params) -> bytes:
        """One scale's SSE events: its partial images (when ``partial_index`` numbers them), the final ones."""
        common = {
            "created_at": int(time.time()),
            "size": f"{self.size}x{self.size}",
            "output_format": "png",
            "revised_prompt": tag,
            "seed": params.seed,
            "scale": ev.si,
            "num_scales": ev.num_scales,
        }
        out = []
        if partial_index is not None:
            assert ev.preview is not None
            out += [
                sse_event(
                    "image_generation.partial_image",
                    {**common, "b64_json": b, "partial_image_index": partial_index, "image_index": i},
                )
                for i, b in enumerate(await asyncio.to_thread(png_b64, ev.preview))
            ]
        if ev.finished:
            assert ev.images is not None
            out += [
                sse_event("image_generation.completed", {**common, "b64_json": b, "image_index": i})
                for i, b in enumerate(await asyncio.to_thread(png_b64, ev.images))
            ]
        return b"".join(out)


def create_app(
    engine: Engine,
    cfg: ServerConfig | None = None,
    warmup: bool = True,
    plans: Mapping[str, RequestPlan | SpeculativePlan | None] | None = None,
    class_names: Sequence[str] | None = None,
    sampling_defaults: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The app; ``plans`` maps a request's ``quality`` ("auto", "high", "medium", "low") to its acceleration plan
    (``serve.config.quality_plans`` for VAR, ``speculative_plans`` for a raster model); without it every request is
    exact. ``class_names`` and
    ``sampling_defaults``: a raster model's, from its pipeline (``LlamaGenPipeline.class_names`` and
    ``.sampling_defaults``); a VAR model carries its names in its config."""
    server = _Server(engine, cfg or ServerConfig(), warmup, plans or {}, class_names, sampling_defaults)
    app = FastAPI(title="nextscale", version="0.1.0", lifespan=server.lifespan)
    app.state.bridge, app.state.metrics = server.bridge, server.metrics
    app.exception_handler(RequestValidationError)(invalid_body)
    app.get("/health")(health)
    app.get("/ready")(server.ready)
    app.get("/metrics")(server.prometheus)
    app.get("/v1/models")(server.models)
    app.get("/", response_class=HTMLResponse)(playground)
    app.post("/v1/images/generations", response_model=None)(server.generate)
    return app
