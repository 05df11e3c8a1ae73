"""HTTP API on a tiny model: generations match the pipeline, SSE order, validation, 429, cancellation."""

from __future__ import annotations

import base64
import io
import json
import logging
import platform
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from nextscale import allocator
from nextscale.cli import serve as serve_cli
from nextscale.cli.main import main
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.scheduler import SchedulerConfig
from nextscale.errors import ConfigError
from nextscale.pipeline import VARPipeline
from nextscale.serve import api
from nextscale.serve.api import ServerConfig, create_app, preview_scales

from .conftest import tiny_pair

NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")


def make_app(**kw) -> tuple:
    var, vae = tiny_pair(5, dict(class_names=NAMES))
    engine = Engine(var, vae, kw.pop("engine_cfg", EngineConfig(max_images_per_request=4)))
    return create_app(engine, ServerConfig(model_name="tiny", **kw)), var, vae


@pytest.fixture(scope="module")
def client():
    app, var, vae = make_app()  # the engine's max_images_per_request=4 is the API's limit
    with TestClient(app) as c:
        c.models = (var, vae)
        yield c


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_health_ready_models_metrics_and_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    info = client.get("/v1/models").json()["data"][0]
    assert info["id"] == "tiny" and info["classes"] == list(NAMES) and info["image_size"] == 8
    page = client.get("/")
    assert page.status_code == 200 and "nextscale playground" in page.text
    text = client.get("/metrics").text
    for name in (
        "nextscale_queue_depth",
        "nextscale_running_requests",
        "nextscale_images_per_second",
        "nextscale_request_latency_seconds_bucket",
        "nextscale_tokens_per_iteration_bucket",
        "nextscale_time_to_first_preview_seconds_bucket",
    ):
        assert name in text


def test_generation_equals_the_pipeline(client):
    r = client.post("/v1/images/generations", json={"prompt": "coat", "n": 2, "seed": 7, "cfg": 2.0, "top_k": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["revised_prompt"] for d in body["data"]] == ["Coat", "Coat"] and body["usage"]["images"] == 2
    pipe = VARPipeline(*client.models, channels_last_decoder=False)
    ref = pipe(["coat", "coat"], seed=7, cfg=2.0, top_k=20)
    for d, im in zip(body["data"], ref.images):
        np.testing.assert_array_equal(decode(d["b64_json"]), np.asarray(im))


def test_stream_sends_a_preview_per_scale_then_the_final_images(client):
    with client.stream(
        "POST", "/v1/images/generations", json={"class_label": 2, "n": 2, "seed": 1, "stream": True}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    kinds = [e["type"] for e in events]
    assert kinds == ["image_generation.partial_image"] * 6 + ["image_generation.completed"] * 2
    assert [e["scale"] for e in events] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [e["partial_image_index"] for e in events[:6]] == [0, 0, 1, 1, 2, 2]
    final = client.post("/v1/images/generations", json={"class_label": 2, "n": 2, "seed": 1}).json()
    assert [e["b64_json"] for e in events[-2:]] == [d["b64_json"] for d in final["data"]]


def test_partial_images_selects_previews():
    assert preview_scales(10, None) == set(range(9))
    assert preview_scales(10, 0) == set()
    assert len(preview_scales(10, 3)) == 3 and max(preview_scales(10, 3)) == 8


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"prompt": "sneaker"}, "prompt", "unknown class 'sneaker'; allowed: 'T-shirt/top'"),
        ({"class_label": 9}, "class_label", "class 9 is out of range"),
        ({"prompt": "coat", "cfg": -1}, "cfg", "greater than or equal to 0"),
        ({"prompt": "coat", "n": 5}, "n", "n=5 is too large: allowed 1..4"),
        ({"prompt": "coat", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "coat", "top_p": 2}, "top_p", "less than or equal to 1"),
        ({"prompt": "coat", "top_k": 100}, "top_k", "exceeds the codebook size 64"),
        ({"prompt": "coat", "size": "512x512"}, "size", "this model makes 8x8 images"),
        ({"prompt": "coat", "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": "coat", "guidance": 3}, "guidance", "unknown field 'guidance'; allowed fields: prompt"),
        ({}, None, "give the class as `prompt`"),
        ({"prompt": "coat", "seed": "abc"}, "seed", "valid integer"),
    ],
)
def test_invalid_bodies_get_422_naming_the_field(client, body, param, text):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"], err


def test_malformed_json_is_422(client):
    r = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_flood_beyond_the_queue_gets_429_while_accepted_requests_complete():
    one_at_a_time = EngineConfig(scheduler=SchedulerConfig(max_running=1), max_images_per_request=4)
    app, _, _ = make_app(max_queue=2, engine_cfg=one_at_a_time)
    results: list[httpx.Response] = []
    with TestClient(app) as c:

        def fire(i: int) -> None:
            results.append(c.post("/v1/images/generations", json={"prompt": "dress", "n": 4, "seed": i}))

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(429) >= 1 and codes.count(200) >= 2 and set(codes) <= {200, 429}
        rejected = next(r for r in results if r.status_code == 429)
        assert int(rejected.headers["Retry-After"]) >= 1 and rejected.json()["error"]["type"] == "overloaded"
        assert all(len(r.json()["data"]) == 4 for r in results if r.status_code == 200)
        assert 'nextscale_requests_total{status="rejected"}' in c.get("/metrics").text


@contextmanager
def live(app) -> Iterator[str]:
    """A real uvicorn server in a thread (client disconnects need a real socket); yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def live_server():
    app, _, _ = make_app(engine_cfg=EngineConfig(scheduler=SchedulerConfig(max_tokens=8), max_images_per_request=4))
    with live(app) as url:
        yield url, app


def test_disconnecting_client_frees_its_capacity(live_server, monkeypatch):
    url, app = live_server
    bridge = app.state.bridge
    encode, hung_up, calls = api.png_b64, threading.Event(), []

    def encode_one_scale_before_the_hang_up(images):  # else the tiny model may finish before the hang-up is seen
        calls.append(images.shape[0])
        if len(calls) > 1:
            hung_up.wait(10)
        return encode(images)

    monkeypatch.setattr(api, "png_b64", encode_one_scale_before_the_hang_up)
    with httpx.stream(
        "POST", f"{url}/v1/images/generations", json={"prompt": "coat", "n": 4, "seed": 0, "stream": True}, timeout=30
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got the first preview, now hang up
    hung_up.set()
    deadline = time.time() + 10
    while (bridge._handles or bridge.engine.requests) and time.time() < deadline:
        time.sleep(0.05)
    assert not bridge._handles and not bridge.engine.requests
    assert bridge.engine.scheduler.rows_in_use == 0
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "coat", "seed": 1}, timeout=30)
    assert r.status_code == 200
    assert 'nextscale_requests_total{status="cancelled"} 1.0' in httpx.get(f"{url}/metrics").text


def test_shutdown_drains_in_flight_work():
    app, _, _ = make_app()
    with TestClient(app) as c:
        bridge = app.state.bridge
        handle = bridge.submit(torch.tensor([1, 2]), __import__("nextscale").SamplingParams(seed=3), previews=False)
        assert c.get("/ready").status_code == 200
    # leaving the context ran the lifespan shutdown: the request finished instead of being dropped
    events = []
    while not handle.events.empty():
        events.append(handle.events.get_nowait())
    assert events and events[-1].finished and events[-1].images.shape[0] == 2
    assert not bridge.accepting


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"prompt": "coat", "cfg": NaN}', "cfg"),
        ('{"prompt": "coat", "top_p": Infinity}', "top_p"),
        ('{"prompt": "coat", "cfg": -Infinity}', "cfg"),
    ],
)
def test_non_finite_numbers_are_422_naming_the_field(client, raw, param):
    r = client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == param and f"{param} must be a finite number" in err["message"], err


def test_a_client_resetting_mid_stream_ends_quietly(monkeypatch, caplog):
    """A reset connection gets no more writes: asyncio warns "socket.send() raised exception." from the 6th write
    into a lost socket before the loop tells uvicorn, and a burst of n partial images was n writes."""
    app, _, _ = make_app(engine_cfg=EngineConfig(max_images_per_request=8))
    client = socket.socket()
    encode, reset = api.png_b64, threading.Event()

    def encode_after_the_client_resets(images):  # deterministic: the reset lands while a preview is encoded
        if not reset.is_set():
            reset.set()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        return encode(images)

    monkeypatch.setattr(api, "png_b64", encode_after_the_client_resets)
    monkeypatch.setattr(logging.getLogger("nextscale"), "propagate", True)  # the CLI tests turn it off
    with live(app) as url, caplog.at_level(logging.DEBUG, logger="nextscale.serve"):
        body = json.dumps({"prompt": "coat", "n": 8, "seed": 0, "stream": True}).encode()
        client.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        client.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        bridge = app.state.bridge
        deadline = time.time() + 10
        while (not reset.is_set() or bridge._handles or bridge.engine.requests) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let the server finish whatever it still writes
        assert reset.is_set() and not bridge._handles and bridge.engine.scheduler.rows_in_use == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len([r for r in caplog.records if "client disconnected" in r.getMessage()]) == 1


def test_the_kv_budget_is_stated_once_in_megabytes():
    with pytest.raises(ConfigError, match=r"scheduler.max_rows=100 is not used: .* set kv_cache_mb instead"):
        EngineConfig(scheduler=SchedulerConfig(max_rows=100))
    engine = Engine(*tiny_pair(5), EngineConfig(kv_cache_mb=0.5))
    assert engine.scheduler.cfg.max_rows == engine.pool.rows != SchedulerConfig().max_rows


@pytest.fixture
def serve_cli_env(monkeypatch):
    """`nextscale serve` in this process: on glibc without tcmalloc (never re-executing pytest), uvicorn stubbed."""
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator, "tune_glibc", lambda: True)
    served: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    return served


@pytest.mark.skipif(platform.system() != "Linux", reason="the allocator fallback is Linux's")
def test_serve_states_the_allocator_once_and_takes_defaults_from_the_configs(serve_cli_env, capsys):
    assert main(["serve", "--kv-cache-mb", "16", "--max-images", "3", "--drain-timeout", "5"]) == 0
    err = capsys.readouterr().err
    # the fallback warning and the serving line name the same allocator
    assert f"using {allocator.TUNED_GLIBC} instead" in err and f"allocator {allocator.TUNED_GLIBC})" in err, err
    assert "allocator system" not in err
    ((app, kw),) = serve_cli_env
    assert kw["timeout_graceful_shutdown"] == 5
    bridge = app.state.bridge
    assert bridge.engine.cfg == EngineConfig(kv_cache_mb=16, max_images_per_request=3)
    assert bridge.max_queue == ServerConfig().max_queue
    assert bridge.engine.scheduler.cfg.max_running == SchedulerConfig().max_running


def test_serve_rejects_bad_settings_in_one_line_before_loading_the_model(serve_cli_env, capsys, monkeypatch):
    monkeypatch.setattr(serve_cli, "load_pipeline", lambda args: pytest.fail("loaded the model first"))
    assert main(["serve", "--max-running", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "nextscale: error: max_running must be >= 1, got 0"
    assert not serve_cli_env
