"""The API app called in-process, without a socket: how a Ray Serve replica runs the one-process server's app.

A replica (``serve.replicas``) holds the same FastAPI app as ``nextscale serve`` — validation, quality plans, the
engine's bridge, 429 with Retry-After, SSE previews, metrics — and answers the router's forwarded requests by
calling that app as ASGI: ``request`` yields the response's status and headers first, then its body chunks as the
app writes them (an SSE stream stays a stream). Closing the iterator early is a client disconnect: the app sees
``http.disconnect`` and its request is cancelled, as behind uvicorn. ``start``/``stop`` run the app's lifespan
(warm-up, then the drain).

Written here rather than borrowed: httpx's ``ASGITransport`` returns a response only once the app has finished (no
streaming), and ``asgi-lifespan`` would be a dependency for the dozen lines of the lifespan handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

Message = dict[str, Any]


class AppFailed(RuntimeError):
    """The app's lifespan startup failed or it ended a response without one."""


class InProcessApp:
    """An ASGI app served to calls in this process (``request``), with its lifespan run by ``start`` / ``stop``."""

    def __init__(self, app: Any):
        self.app = app
        self._lifespan: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()

    async def start(self) -> None:
        """Run the app's startup (a warm-up generation for the API app) and return once it completed."""

        async def receive() -> Message:
            return await self._to_app.get()

        async def send(message: Message) -> None:
            await self._from_app.put(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._lifespan = asyncio.ensure_future(self.app(scope, receive, send))
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._reply("startup")
        if reply["type"] != "lifespan.startup.complete":
            raise AppFailed(f"the app failed to start: {reply.get('message', '')}")

    async def stop(self) -> None:
        """Run the app's shutdown (the engine's drain) and wait for it."""
        if self._lifespan is None or self._lifespan.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._reply("shutdown")
        await self._lifespan

    async def _reply(self, phase: str) -> Message:
        assert self._lifespan is not None
        get = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait({get, self._lifespan}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        err = self._lifespan.exception()
        raise AppFailed(f"the app's lifespan ended during {phase}: {err!r}") from err

    async def request(
        self, method: str, path: str, query: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Any]:
        """The app's response to one request: ``(status, headers)`` first, then the body's chunks (bytes)."""
        disconnected = asyncio.Event()
        sent: asyncio.Queue[Message] = asyncio.Queue()
        request_sent = False

        async def receive() -> Message:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await sent.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method.upper(),
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("latin-1"),
            "root_path": "",
            "query_string": query.encode("latin-1"),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        task = asyncio.ensure_future(self.app(scope, receive, send))
        try:
            while True:
                get = asyncio.ensure_future(sent.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the app returned (or raised) with nothing more to send
                    get.cancel()
                    if task.exception() is not None:
                        raise AppFailed(f"the app failed: {task.exception()!r}") from task.exception()
                    raise AppFailed("the app ended without completing its response")
                message = get.result()
                if message["type"] == "http.response.start":
                    hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                    yield message["status"], hdrs
                elif message["type"] == "http.response.body":
                    if chunk := message.get("body", b""):
                        yield chunk
                    if not message.get("more_body", False):
                        return
        finally:  # normal end, or the caller went away (its client disconnected): the app is told, then stopped
            disconnected.set()
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
