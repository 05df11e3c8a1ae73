"""The HTTP edge: an OpenAI-shaped image API with streamed coarse-to-fine previews, health, metrics, playground.

Every model family serves through the same API; what the server knows of the model comes from the engine's family
(``engine.family.ServingFacts``). A VAR model streams a preview per scale, a raster (LlamaGen) model one per
completed row of its token grid (the rows decoded so far); ``scale`` and ``num_scales`` in the events count those
steps.

Errors follow one shape, ``{"error": {"message", "type", "param", "code"}}``: 422 for invalid bodies — including
bodies that do not parse (not UTF-8, not JSON, too deeply nested, a number too long) — naming the field and what is
allowed, 415 for a body that is not JSON, 429 with ``Retry-After`` (estimated from the measured completion rate)
when the queue is full, 503 while not ready or draining (and to a request the drain timeout abandoned).

A request's ``quality`` picks a plan (``serve.config``); responses report what it resolved to: ``quality`` and
``acceleration``, the plan's methods as spec strings (``[]``: exact).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
import typing
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import pydantic
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nextscale.engine.engine import Engine, ScaleEvent
from nextscale.engine.family import bad_field
from nextscale.errors import InvalidInputError
from nextscale.images import to_pil
from nextscale.labels import resolve_label
from nextscale.serve.async_engine import AsyncEngine, Handle, QueueFull, ShuttingDown
from nextscale.serve.config import QUALITIES, QualityPlan, ServerConfig
from nextscale.serve.metrics import CompletionRate, ServerMetrics
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


class BadBody(Exception):
    """A request body that cannot become an ``ImageGenerationRequest``, as the API's error response."""

    def __init__(self, message: str, param: str | None = None, status: int = 422):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def response(self) -> JSONResponse:
        return error(self.status, self.message, "invalid_request_error", self.param)


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """The pydantic models an annotation may hold (``A | None``, ``list[A]``): where a ``loc`` may go deeper."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def field_path(loc: Sequence[int | str], model: type[pydantic.BaseModel] = ImageGenerationRequest) -> str | None:
    """The field a pydantic error's ``loc`` names, as a client spelled it: ``class_label``, not pydantic's
    ``class_label.int`` (validating a union, pydantic tags each member's error with the member's type; such tags,
    and FastAPI's leading ``body``, are not fields and are dropped). List indices read ``items[2]``."""
    path: list[str] = []
    models: list[type[pydantic.BaseModel]] = [model]
    for item in loc:
        if isinstance(item, int):
            if path:
                path[-1] += f"[{item}]"
            continue
        owner = next((m for m in models if item in m.model_fields), None)
        if owner is not None:
            path.append(item)
            models = _models_in(owner.model_fields[item].annotation)
    return ".".join(path) or None


def _shown(value: Any, limit: int = 60) -> str:
    """A client's value as JSON, cut short: the message is one line however long the input."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(errors: Sequence[Any], model: type[pydantic.BaseModel] = ImageGenerationRequest) -> BadBody:
    """pydantic's errors as one message about the first field that failed (``param`` names it). A union field's
    errors (one per member type) become one sentence: "class_label should be a valid integer or a valid string"."""
    first: Mapping[str, Any] = next(iter(errors), {})
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param, msg, kind = field_path(loc, model), first.get("msg", "invalid request"), first.get("type")
    if kind == "extra_forbidden":
        unknown = ".".join([*([param] if param else []), str(loc[-1])])
        return BadBody(f"unknown field {unknown!r}; allowed fields: {', '.join(model.model_fields)}", unknown)
    if kind == "json_invalid":
        return BadBody("request body is not valid JSON")
    if kind == "finite_number":  # spelled as the client sent it: NaN, Infinity, -Infinity
        return BadBody(f"{param} must be a finite number, got {_shown(first.get('input'))}", param)
    same = [e for e in errors if field_path([p for p in e.get("loc", ()) if p != "body"], model) == param]
    prefix = "Input should be "
    if param and len(same) > 1 and all(e.get("msg", "").startswith(prefix) for e in same):
        # one error per member of a union: "a valid integer, got a number with a fractional part" -> "a valid integer"
        wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix(prefix).split(",")[0] for e in same))
        return BadBody(f"{param} should be {wanted}, got {_shown(first.get('input'))}", param)
    return BadBody(f"{param}: {msg}" if param else msg, param)


async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 in the API's error shape, naming the field and what it allows."""
    return validation_message(exc.errors()).response()


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the API's error shape."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return error(exc.status_code, message, kind, headers=dict(exc.headers or {}))


def _is_json(content_type: str | None) -> bool:
    if not content_type:  # curl --data-binary without a header; FastAPI parses these as JSON too
        return True
    mime = content_type.split(";")[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


async def parse_request(request: Request) -> ImageGenerationRequest:
    """The body as an ``ImageGenerationRequest``, or ``BadBody`` saying why not in one line.

    Parsed here rather than by FastAPI, whose own 400 (another shape, no reason given) answers bodies that are not
    UTF-8, nest deeper than Python recurses, or hold an integer longer than Python converts (4300 digits).
    JSON only: a form or text body is refused (415), which also keeps other web pages from posting here without
    a CORS preflight."""
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        raise BadBody(f"request body must be JSON (content-type: application/json), got {content_type!r}", status=415)
    raw = await request.body()
    if not raw.strip():
        raise BadBody('request body is empty; send a JSON object such as {"prompt": "coat"}')
    try:
        # JSON over HTTP is UTF-8 (RFC 8259; a BOM is tolerated): json.loads(bytes) would guess UTF-16 from a stray
        # byte pair and name the wrong byte.
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:  # before ValueError: it is one
        raise BadBody(f"request body is not UTF-8: byte 0x{e.object[e.start]:02x} at position {e.start}") from None
    except json.JSONDecodeError as e:
        raise BadBody(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # the integer-length limit (CVE-2020-10735's mitigation), less its advice to the server
        raise BadBody(f"request body cannot be read: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise BadBody("request body is nested too deeply (the API takes a flat JSON object)") from None
    if not isinstance(obj, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        got = kinds.get(type(obj), "null")
        fields = ", ".join(ImageGenerationRequest.model_fields)
        raise BadBody(f"request body must be a JSON object with the fields {fields}, got {got}")
    try:
        return ImageGenerationRequest.model_validate(obj)
    except pydantic.ValidationError as e:
        raise validation_message(e.errors()) from None


def describe(plan: QualityPlan) -> str:
    return " + ".join(plan.methods) or "exact"


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
        plans: Mapping[str, Any],
    ):
        self.cfg, self.warmup = cfg, warmup
        self.model = engine.family.serving_facts()
        for q, given in plans.items():
            if q not in QUALITIES:
                raise InvalidInputError(f"unknown quality level {q!r}; allowed: {', '.join(QUALITIES)}")
            plan = given.plan if isinstance(given, QualityPlan) else given
            try:  # the family's own admission check, as a request would meet it: a plan of another family fails
                engine.family.admit(*self.model.warmup_request(), plan)
            except InvalidInputError as e:
                raise InvalidInputError(f"quality {q!r}: {e}") from None
        # quality level -> plan and what it runs (a missing level is the exact plan)
        self.plans = {q: QualityPlan.of(plans.get(q)) for q in QUALITIES}
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
            h = self.bridge.submit(*self.model.warmup_request(), previews=False)
            while not (await next_event(h)).finished:
                pass
            # its first step pays one-off costs (lazy initialisation, first allocations): no sample of the rate
            self.bridge.rate = CompletionRate(self.bridge.rate.window, self.bridge.rate.clock)
        log.info("quality levels: %s", "; ".join(f"{q} = {describe(p)}" for q, p in self.plans.items()))
        self.is_ready = True
        yield
        self.is_ready = False
        b = self.bridge
        abandoned = await b.shutdown(self.cfg.drain_timeout)
        took = time.monotonic() - (b.drain_started or time.monotonic())
        if abandoned:
            log.warning(
                "drain timed out after %gs: %d of %d in-flight requests abandoned (their clients got 503)",
                self.cfg.drain_timeout,
                abandoned,
                b.in_flight_at_drain,
            )
        else:
            log.info("drained: %d in-flight requests finished in %.1fs", b.in_flight_at_drain, took)

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
                    "step_unit": m.step_unit,  # what num_scales and the events' `scale` count: "scale" or "row"
                    "num_classes": m.num_classes,
                    "classes": list(names) if names else [str(i) for i in range(m.num_classes)],
                    "max_images_per_request": self.max_images,
                    "qualities": {q: list(p.methods) for q, p in self.plans.items()},  # [] = exact
                }
            ],
        }

    async def generate(self, request: Request) -> Response:
        try:
            body = await parse_request(request)
        except BadBody as e:
            return e.response()
        try:
            condition, tag, params = self._validate(body)
        except InvalidInputError as e:
            return error(422, str(e), "invalid_request_error", getattr(e, "param", None))
        if not self.is_ready:
            return error(503, "server is starting up", "unavailable")
        previews = preview_scales(self.model.steps, body.partial_images) if body.stream else set()
        quality = self.plans[body.quality]
        try:
            handle = self.bridge.submit(condition, params, previews=bool(previews), plan=quality.plan)
        except QueueFull as e:
            self.metrics.requests.labels(status="rejected").inc()
            return error(
                429,
                f"too many requests waiting (max_queue={self.cfg.max_queue}); retry in {e.retry_after}s",
                "overloaded",
                headers={"Retry-After": str(e.retry_after)},
            )
        except ShuttingDown:
            return error(503, "server is shutting down", "unavailable")
        self.metrics.by_quality.labels(quality=body.quality).inc()
        resolved = {"quality": body.quality, "acceleration": list(quality.methods)}  # what the preset does
        if body.stream:
            return StreamingResponse(
                self._sse(handle, request, previews, tag, params, resolved),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._complete(handle, request, tag, params, resolved)

    def _validate(self, body: ImageGenerationRequest) -> tuple[Any, str, Any]:
        """The request's condition, its name in responses (``revised_prompt``) and its params; one-line errors
        naming the field."""
        m = self.model
        if body.n > self.max_images:
            raise bad_field("n", f"n={body.n} is too large: allowed 1..{self.max_images}")
        if body.model is not None and body.model != self.cfg.model_name:
            raise bad_field("model", f"unknown model {body.model!r}; this server serves {self.cfg.model_name!r}")
        if body.top_k > m.vocab_size:
            raise bad_field("top_k", f"top_k={body.top_k} exceeds the codebook size {m.vocab_size} (0..{m.vocab_size})")
        values = body.model_dump()
        if m.make_condition is not None:
            condition, tag = m.make_condition(values, body.n)
        else:
            condition, tag = self._class_condition(body)
        seed = secrets.randbits(63) if body.seed is None else body.seed
        return condition, tag, m.params(body.model_fields_set, values, seed)

    def _class_condition(self, body: ImageGenerationRequest) -> tuple[torch.Tensor, str]:
        """A class-conditional model's condition: ``prompt`` (a class name or index) or ``class_label``, at its one
        image size."""
        size, m = self.size, self.model
        if body.size is not None and body.size != f"{size}x{size}":
            raise bad_field("size", f"size {body.size!r} is not supported: this model makes {size}x{size} images")
        for name in ("negative_prompt", "tau"):
            if getattr(body, name) is not None:
                raise bad_field(name, f"{name} is a text-to-image setting; this model is class-conditional")
        try:
            label = resolve_label(body.label, m.num_classes, self.names)
        except InvalidInputError as e:
            raise bad_field("class_label" if body.class_label is not None else "prompt", str(e)) from None
        names = self.names
        tag = names[label] if names and label < len(names) else str(label)
        return torch.full((body.n,), label, dtype=torch.long), tag

    async def _complete(
        self, handle: Handle, request: Request, tag: str, params: Any, resolved: dict[str, Any]
    ) -> Response:
        async def wait_final() -> ScaleEvent:
            while not (ev := await next_event(handle)).finished:
                pass
            return ev

        async def disconnected() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        final_task, gone_task = asyncio.ensure_future(wait_final()), asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({final_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled: the request must not outlive it
            gone_task.cancel()
            if not final_task.done():
                final_task.cancel()
                self.bridge.abort(handle.request_id)
        if final_task not in done:
            log.debug("%s: client disconnected; request cancelled", handle.request_id)
            return error(499, "client disconnected", "cancelled")
        try:
            final = final_task.result()
        except ShuttingDown as e:  # the drain timeout ran out before this request finished
            return error(503, f"{e} (drain timeout {self.cfg.drain_timeout:g}s)", "unavailable")
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
                **resolved,
            }
        )

    async def _sse(
        self, handle: Handle, request: Request, previews: set[int], tag: str, params: Any, resolved: dict[str, Any]
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
                    why = f"{e} (drain timeout {self.cfg.drain_timeout:g}s)" if isinstance(e, ShuttingDown) else e
                    yield sse_event("error", {"message": f"generation failed: {why}"})
                    return
                if await request.is_disconnected():
                    return
                finished = ev.finished
                preview = ev.preview is not None and ev.si in previews
                if chunk := await self._scale_events(ev, partials if preview else None, tag, params, resolved):
                    yield chunk
                partials += preview
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:  # client gone (or the engine failed): free the request's capacity now
                self.bridge.abort(handle.request_id)
                if not failed:
                    log.debug("%s: client disconnected mid-stream; request cancelled", handle.request_id)

    async def _scale_events(
        self, ev: ScaleEvent, partial_index: int | None, tag: str, params: Any, resolved: dict[str, Any]
    ) -> bytes:
        """One scale's SSE events: its partial images (when ``partial_index`` numbers them), the final ones (with
        what the request's quality resolved to)."""
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
                sse_event("image_generation.completed", {**common, **resolved, "b64_json": b, "image_index": i})
                for i, b in enumerate(await asyncio.to_thread(png_b64, ev.images))
            ]
        return b"".join(out)


def create_app(
    engine: Engine, cfg: ServerConfig | None = None, warmup: bool = True, plans: Mapping[str, Any] | None = None
) -> FastAPI:
    """The app; ``plans`` maps a request's ``quality`` ("auto", "high", "medium", "low") to its plan and what it
    runs (``serve.config.quality_plans(pipe, default)``; a bare plan is described by what it carries); without it
    every request is exact. What the server knows of the model (class names, sampling defaults, its facts) comes
    from the engine's family (``engine.family.serving_facts()``)."""
    server = _Server(engine, cfg or ServerConfig(), warmup, plans or {})
    app = FastAPI(title="nextscale", version="0.1.0", lifespan=server.lifespan)
    app.state.bridge, app.state.metrics = server.bridge, server.metrics
    app.exception_handler(RequestValidationError)(invalid_body)
    app.exception_handler(HTTPException)(http_error)
    app.get("/health")(health)
    app.get("/ready")(server.ready)
    app.get("/metrics")(server.prometheus)
    app.get("/v1/models")(server.models)
    app.get("/", response_class=HTMLResponse)(playground)
    # The route parses its own body (``parse_request``); the schema is stated for /docs.
    body_schema = {
        "required": True,
        "content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}},
    }
    app.post("/v1/images/generations", response_model=None, openapi_extra={"requestBody": body_schema})(server.generate)
    return app
