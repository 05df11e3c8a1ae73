"""What the server does the same way for every model family: backpressure, disconnects, drain.

One test per behaviour, parametrised by family: the server talks to a family only through the engine's
``Family`` seam, so these must hold for a new family without a new test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from nextscale.engine.engine import EngineConfig
from nextscale.engine.scheduler import SchedulerConfig
from nextscale.serve.metrics import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S

from .conftest import tiny_pair, tiny_raster_pipe
from .helpers import live, raster_app, var_app, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Served:
    """How to stand up a tiny server of one family: ``app(**kw)`` (kw: engine_cfg and ServerConfig fields), a class
    name it knows, and its sampling params for a direct submission."""

    app: Callable[..., FastAPI]
    prompt: str
    params: Callable[[int], object]


def _var() -> Served:
    from nextscale.engine.var.params import SamplingParams

    var, vae = tiny_pair(5, dict(class_names=("a", "b", "c", "dress", "e")))
    return Served(lambda **kw: var_app(var, vae, **kw), "dress", lambda seed: SamplingParams(seed=seed))


def _raster() -> Served:
    from nextscale.engine.raster.params import RasterParams

    pipe = tiny_raster_pipe()
    pipe.set_class_names(tuple(f"class-{i}" for i in range(10)))
    return Served(lambda **kw: raster_app(pipe, **kw), "class-2", lambda seed: RasterParams(seed=seed))


@pytest.fixture(scope="module", params=["var", "raster"])
def served(request) -> Served:
    return {"var": _var, "raster": _raster}[request.param]()


def test_flood_beyond_the_queue_gets_429_while_accepted_requests_complete(served):
    one_at_a_time = EngineConfig(scheduler=SchedulerConfig(max_running=1), max_images_per_request=4)
    app = served.app(max_queue=2, engine_cfg=one_at_a_time)
    results: list[httpx.Response] = []
    with TestClient(app) as c:

        def fire(i: int) -> None:
            results.append(c.post("/v1/images/generations", json={"prompt": served.prompt, "n": 4, "seed": i}))

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(429) >= 1 and codes.count(200) >= 2 and set(codes) <= {200, 429}
        rejected = next(r for r in results if r.status_code == 429)
        wait = int(rejected.headers["Retry-After"])
        assert RETRY_AFTER_MIN_S <= wait <= RETRY_AFTER_MAX_S and rejected.json()["error"]["type"] == "overloaded"
        assert f"retry in {wait}s" in rejected.json()["error"]["message"]
        assert all(len(r.json()["data"]) == 4 for r in results if r.status_code == 200)
        assert 'nextscale_requests_total{status="rejected"}' in c.get("/metrics").text


def test_disconnecting_client_frees_its_capacity(served, monkeypatch):
    app = served.app()
    bridge = app.state.bridge
    family = bridge.engine.family
    preview, calls = family.preview, []

    def second_preview_waits_for_the_hang_up(state, result):  # else the tiny model may finish first
        calls.append(result.step)
        if len(calls) == 2:
            wait_until(lambda: not bridge._handles, what="the hang-up to drop the request")
        return preview(state, result)

    monkeypatch.setattr(family, "preview", second_preview_waits_for_the_hang_up)
    with live(app) as url:
        body = {"prompt": served.prompt, "n": 4, "seed": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # got the first preview, now hang up
        wait_until(lambda: not bridge._handles and not bridge.engine.requests, what="the request to be dropped")
        assert bridge.engine.scheduler.rows_in_use == 0 and not bridge.engine.pool.slots
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": served.prompt, "seed": 1}, timeout=30)
        assert r.status_code == 200
        assert 'nextscale_requests_total{status="cancelled"} 1.0' in httpx.get(f"{url}/metrics").text


def test_shutdown_drains_in_flight_work(served):
    app = served.app()
    with TestClient(app) as c:
        bridge = app.state.bridge
        handle = bridge.submit(torch.tensor([1, 2]), served.params(3), previews=False)
        assert c.get("/ready").status_code == 200
    # leaving the context ran the lifespan shutdown: the request finished instead of being dropped
    events = []
    while not handle.events.empty():
        events.append(handle.events.get_nowait())
    assert events and events[-1].finished and events[-1].images.shape[0] == 2
    assert not bridge.accepting and bridge.abandoned == 0
