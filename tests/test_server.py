"""HTTP API on a tiny model: generations match the pipeline, SSE order, validation, 429, cancellation, drain, and
``nextscale serve``'s lifecycle (bind before "serving on", exit 0 after a clean drain)."""

from __future__ import annotations

import json
import logging
import math
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from nextscale import allocator
from nextscale.cli import serve as serve_cli
from nextscale.cli.main import main
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.scheduler import SchedulerConfig
from nextscale.engine.var.family import VARFamily
from nextscale.errors import ConfigError
from nextscale.pipelines.var import VARPipeline
from nextscale.serve import api
from nextscale.serve import server as runner
from nextscale.serve.api import ServerConfig, create_app, field_path, preview_scales
from nextscale.serve.async_engine import AsyncEngine, QueueFull, ShuttingDown
from nextscale.serve.config import QUALITIES, quality_plans
from nextscale.serve.metrics import (
    RETRY_AFTER_FALLBACK_S,
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    CompletionRate,
    ServerMetrics,
)

from .conftest import tiny_pair
from .helpers import FMNIST, decode, live, ready, var_app, wait_until

NAMES = FMNIST[:5]


def make_app(**kw) -> tuple:
    """The API over a tiny VAR model with 5 class names (``live_server``'s model), and that model."""
    var, vae = tiny_pair(5, dict(class_names=NAMES))
    return var_app(var, vae, **kw), var, vae


@pytest.fixture(scope="module")
def client():
    app, var, vae = make_app()  # the engine's max_images_per_request=4 is the API's limit
    with TestClient(app) as c:
        c.models = (var, vae)
        yield c


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
        ({}, None, "give `prompt` (the text, or a class name) or `class_label`"),
        ({"prompt": "coat", "seed": "abc"}, "seed", "valid integer"),
        # a union field: pydantic's loc says class_label.int / class_label.str; the client named class_label
        ({"class_label": 1.5}, "class_label", "class_label should be a valid integer or a valid string, got 1.5"),
        ({"class_label": [1]}, "class_label", "class_label should be a valid integer or a valid string, got [1]"),
        ({"prompt": "coat", "quality": "ultra"}, "quality", "'auto', 'high', 'medium' or 'low'"),
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


def assert_api_error(r: httpx.Response, status: int, text: str, param: str | None = None) -> dict:
    """The API's one error shape, one line of message."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert text in err["message"] and "\n" not in err["message"] and err["param"] == param, err
    return err


@pytest.mark.parametrize(
    "raw, text",
    [
        (b'{"prompt": "coat", "seed": 1\xff}', "request body is not UTF-8: byte 0xff at position 28"),
        (b'\xff\xfe{"prompt": "coat"}', "request body is not UTF-8: byte 0xff at position 0"),
        (b'{"prompt": "coat", "seed": ' + b"7" * 4301 + b"}", "Exceeds the limit (4300 digits)"),
        (b"[" * 100_000 + b"]" * 100_000, "request body is nested too deeply"),
        (b"", "request body is empty"),
        (b"  ", "request body is empty"),
        (b'{"prompt": "coat",}', "request body is not valid JSON: Expecting property name"),
        (b"[1, 2]", "request body must be a JSON object with the fields prompt, class_label"),
        (b'"coat"', "got a string"),
        (b"null", "got null"),
    ],
)
def test_bodies_that_do_not_parse_get_the_apis_error_shape(client, raw, text):
    """FastAPI answered these with its own 400 ({"detail": ...}); the README says invalid bodies get 422."""
    r = client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert_api_error(r, 422, text)


def test_a_body_that_is_not_json_is_415_and_json_types_are_accepted(client):
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends without -H
    r = client.post("/v1/images/generations", content=b"prompt=coat", headers=form)
    assert_api_error(r, 415, "request body must be JSON (content-type: application/json), got 'application/x-www")
    ok = {"prompt": "coat", "seed": 1}
    for kind in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = client.post("/v1/images/generations", content=json.dumps(ok), headers={"content-type": kind})
        assert r.status_code == 200, (kind, r.text)


def test_unknown_paths_and_methods_get_the_apis_error_shape(client):
    assert_api_error(client.get("/v1/images/generations"), 405, "Method Not Allowed: GET /v1/images/generations")
    assert_api_error(client.get("/v2/nope"), 404, "Not Found: GET /v2/nope")


def test_field_path_drops_pydantics_union_tags_generically():
    class Inner(api.pydantic.BaseModel):
        size: int | str

    class Outer(api.pydantic.BaseModel):
        inner: Inner | None = None
        items: list[Inner] = api.pydantic.Field(default_factory=list)

    assert field_path(("body", "class_label", "int")) == "class_label"
    assert field_path(("body", "class_label", "function-after[x]")) == "class_label"
    assert field_path(("inner", "Inner", "size", "int"), Outer) == "inner.size"
    assert field_path(("items", 2, "size", "str"), Outer) == "items[2].size"
    assert field_path(("body",)) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_completion_rate_counts_busy_time_only_and_sets_retry_after():
    clock = FakeClock()
    rate = CompletionRate(window=30.0, clock=clock)
    assert rate.per_second is None and rate.retry_after(40) == RETRY_AFTER_FALLBACK_S  # nothing measured yet
    for _ in range(4):  # a burst: 4 steps of 0.5 s, 2 images finished by each
        rate.busy()
        clock.now += 0.5
        rate.done(2, busy=True)
    rate.done(0, busy=False)  # the queue ran dry
    assert rate.per_second == pytest.approx(4.0)
    clock.now += 50.0  # idle: counts for nothing (a wall-clock rate would have fallen to 8 images / 52 s)
    rate.busy()
    clock.now += 1.0
    rate.done(4, busy=False)
    assert rate.per_second == pytest.approx(4.0)
    assert rate.retry_after(12) == 3 and rate.retry_after(13) == 4  # 13 images at 4/s: 3.25 s, rounded up
    assert rate.retry_after(0) == RETRY_AFTER_MIN_S and rate.retry_after(10**6) == RETRY_AFTER_MAX_S


def test_the_completion_rate_follows_a_change_within_its_window():
    clock = FakeClock()
    rate = CompletionRate(window=10.0, clock=clock)
    rate.busy()
    for _ in range(100):  # 10 images/s for 100 s
        clock.now += 1.0
        rate.done(10, busy=True)
    assert rate.per_second == pytest.approx(10.0)
    for _ in range(30):  # then 1 image/s for three windows: the old rate has all but faded
        clock.now += 1.0
        rate.done(1, busy=True)
    assert 1.0 < rate.per_second < 1.0 + 9.0 * math.exp(-3) * 1.1
    with pytest.raises(ValueError, match="window must be a finite number of seconds > 0, got nan"):
        CompletionRate(window=float("nan"))


def test_retry_after_is_the_images_ahead_at_the_measured_rate():
    """The 429's Retry-After: images waiting and running (not requests) over the measured rate."""
    var, vae = tiny_pair(5)
    clock = FakeClock()
    rate = CompletionRate(clock=clock)
    rate.busy()
    clock.now += 2.0
    rate.done(5, busy=False)  # 2.5 images/s
    bridge = AsyncEngine(Engine(VARFamily(var, vae), EngineConfig(max_images_per_request=4)), ServerMetrics(), 2, rate)
    bridge.submit(torch.tensor([0, 1, 2, 3]), __import__("nextscale").SamplingParams(seed=0), previews=False)
    bridge.submit(torch.tensor([0, 1, 2]), __import__("nextscale").SamplingParams(seed=1), previews=False)
    with pytest.raises(QueueFull) as full:
        bridge.submit(torch.tensor([0]), __import__("nextscale").SamplingParams(seed=2), previews=False)
    assert full.value.retry_after == 3  # 7 images at 2.5/s: 2.8 s


def test_responses_report_what_their_quality_resolved_to():
    """A preset says what it does: /v1/models lists each level's methods, and every response (the SSE final events
    too) names its quality and the methods it ran, as spec strings ([] = exact)."""
    var, vae = tiny_pair(5, dict(class_names=NAMES))
    plans = quality_plans(VARPipeline(var, vae, channels_last_decoder=False), "cfg-cutoff:last=1")
    app = create_app(Engine(VARFamily(var, vae), EngineConfig(max_images_per_request=4)), ServerConfig(), plans=plans)
    with TestClient(app) as c:
        info = c.get("/v1/models").json()["data"][0]
        assert info["step_unit"] == "scale" and list(info["qualities"]) == list(QUALITIES)
        assert info["qualities"] == {q: list(p.methods) for q, p in plans.items()}
        assert info["qualities"]["auto"] == ["cfg-cutoff:last=1"] and info["qualities"]["high"] == []
        assert info["qualities"]["low"] == ["cfg-cutoff"], "fast without a refiner (built-in: never drops a scale)"
        for q in QUALITIES:
            body = c.post("/v1/images/generations", json={"prompt": "coat", "seed": 1, "quality": q}).json()
            assert (body["quality"], body["acceleration"]) == (q, info["qualities"][q])
        body = {"prompt": "coat", "n": 2, "seed": 1, "quality": "low", "stream": True}
        with c.stream("POST", "/v1/images/generations", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    final = [e for e in events if e["type"] == "image_generation.completed"]
    assert len(final) == 2 and all(e["acceleration"] == info["qualities"]["low"] for e in final)
    assert all(e["quality"] == "low" for e in final) and all("quality" not in e for e in events if e not in final)


def test_a_drain_that_times_out_answers_what_it_abandons(monkeypatch, caplog):
    """Past the drain timeout the bridge abandons what is left: its handler gets ShuttingDown (a 503 or an SSE
    error for its client, not a cut connection) and ``abandoned`` makes ``serve`` exit non-zero."""
    app, _, _ = make_app(drain_timeout=0)
    held, draining = threading.Event(), threading.Event()
    with TestClient(app):
        bridge = app.state.bridge
        step, drain = bridge.engine.step, bridge.drain

        def held_until_the_drain(**kw):  # the request cannot finish before the drain begins
            held.set()
            draining.wait(120)
            return step(**kw)

        def drain_then_release(timeout):
            drain(timeout)
            draining.set()

        monkeypatch.setattr(bridge.engine, "step", held_until_the_drain)
        monkeypatch.setattr(bridge, "drain", drain_then_release)
        handle = bridge.submit(torch.tensor([1, 2]), __import__("nextscale").SamplingParams(seed=3), previews=False)
        assert held.wait(120)
        caplog.set_level(logging.INFO, logger="nextscale.serve")
    events = []
    while not handle.events.empty():
        events.append(handle.events.get_nowait())
    assert isinstance(events[-1], ShuttingDown) and bridge.abandoned == 1
    assert "drain timed out after 0s: 1 of 1 in-flight requests abandoned" in caplog.text
    assert 'nextscale_requests_total{status="abandoned"} 1.0' in app.state.metrics.render().decode()


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


class Records(logging.Handler):
    """The records of one logger, whatever other handlers it has or whether it propagates (an in-process CLI run
    turns propagation off); ``seen`` is set by the first record containing ``text``."""

    def __init__(self, text: str):
        super().__init__(logging.DEBUG)
        self.text, self.seen, self.records = text, threading.Event(), []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.text in record.getMessage():
            self.seen.set()


@contextmanager
def records(logger_name: str, text: str) -> Iterator[Records]:
    logger, handler = logging.getLogger(logger_name), Records(text)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_client_resetting_mid_stream_ends_quietly(monkeypatch, caplog):
    """A reset connection gets no more writes: asyncio warns "socket.send() raised exception." from the 6th write
    into a lost socket before the loop tells uvicorn, and a burst of n partial images was n writes."""
    app, _, _ = make_app(engine_cfg=EngineConfig(max_images_per_request=8))
    client = socket.socket()
    encode, reset, handled = api.png_b64, threading.Event(), threading.Event()

    def encode_after_the_client_resets(images):  # deterministic: the reset lands while a preview is encoded
        if not reset.is_set():
            reset.set()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        return encode(images)

    async def app_telling_when_a_generation_is_answered(scope, receive, send):
        try:
            await app(scope, receive, send)
        finally:  # every write of the response has been made (or refused) by now
            if scope["type"] == "http" and scope["path"] == "/v1/images/generations":
                handled.set()

    monkeypatch.setattr(api, "png_b64", encode_after_the_client_resets)
    with (
        live(app_telling_when_a_generation_is_answered) as url,
        records("nextscale.serve", "client disconnected") as log,
        caplog.at_level(logging.WARNING),  # asyncio's warning goes to the root logger
    ):
        body = json.dumps({"prompt": "coat", "n": 8, "seed": 0, "stream": True}).encode()
        client.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        client.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert handled.wait(120) and log.seen.is_set() and reset.is_set()
        bridge = app.state.bridge
        wait_until(lambda: bridge.engine.scheduler.rows_in_use == 0, what="the engine to free the request's rows")
        assert not bridge._handles
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len([r for r in log.records if "client disconnected" in r.getMessage()]) == 1


def test_the_kv_budget_is_stated_once_in_megabytes():
    with pytest.raises(ConfigError, match=r"scheduler.max_rows=100 is not used: .* set kv_cache_mb instead"):
        EngineConfig(scheduler=SchedulerConfig(max_rows=100))
    engine = Engine(VARFamily(*tiny_pair(5)), EngineConfig(kv_cache_mb=0.5))
    assert engine.scheduler.cfg.max_rows == engine.pool.rows != SchedulerConfig().max_rows


def exit_status(argv: list[str]) -> int:
    """``main``'s status, whether a bad value is refused by argparse (SystemExit) or by the command."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.skipif(platform.system() != "Linux", reason="the allocator fallback is Linux's")
def test_serve_states_the_allocator_once_and_takes_defaults_from_the_configs(serve_cli_env, capsys):
    assert main(["serve", "--port", "0", "--kv-cache-mb", "16", "--max-images", "3", "--drain-timeout", "5"]) == 0
    err = capsys.readouterr().err
    # the fallback warning and the serving line name the same allocator
    assert f"using {allocator.TUNED_GLIBC} instead" in err and f"allocator {allocator.TUNED_GLIBC})" in err, err
    assert "allocator system" not in err
    ((app, drain_timeout, (host, port)),) = serve_cli_env
    assert drain_timeout == 5 and f"serving demo-fmnist on http://{host}:{port} " in err and port != 0
    bridge = app.state.bridge
    assert bridge.engine.cfg == EngineConfig(kv_cache_mb=16, max_images_per_request=3)
    assert bridge.max_queue == ServerConfig().max_queue
    assert bridge.engine.scheduler.cfg.max_running == SchedulerConfig().max_running


def test_serve_rejects_bad_settings_in_one_line_before_loading_the_model(serve_cli_env, capsys, monkeypatch):
    monkeypatch.setattr(serve_cli, "load_pipeline", lambda *a, **kw: pytest.fail("loaded the model first"))
    assert exit_status(["serve", "--port", "0", "--max-running", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"max.running", err[0]) and "0" in err[0], err
    assert not serve_cli_env


def test_serve_on_a_port_in_use_or_a_foreign_address_fails_in_one_line_before_serving(
    serve_cli_env, capsys, monkeypatch
):
    """uvicorn bound the port only after the model had loaded and "serving on" was printed, then exited 3."""
    monkeypatch.setattr(serve_cli, "load_pipeline", lambda *a, **kw: pytest.fail("loaded the model first"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"nextscale: error: cannot serve on 127.0.0.1:{port}: Address already in use; choose another --port (0: any "
        "free port)"
    ]
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): a valid address that is on no machine's interface; no DNS needed
    assert main(["serve", "--host", "192.0.2.1", "--port", "8123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nextscale: error: cannot serve on 192.0.2.1:8123: Cannot assign requested address"]
    assert not serve_cli_env


def test_listen_names_the_host_and_the_reason_of_a_host_that_does_not_resolve():
    with pytest.raises(ConfigError, match=r"^cannot serve on no such host!:80: .+ \(--host\)$"):
        runner.listen("no such host!", 80)
    with pytest.raises(ConfigError, match=r"^cannot serve on a\.\.b:80: .*label empty"):
        runner.listen("a..b", 80)
    with runner.listen("127.0.0.1", 0) as s:
        assert s.getsockname()[1] != 0


def test_sigterm_drains_in_flight_work_and_exits_0(tmp_path):
    """`nextscale serve` on the bundled model in its own process: a request in flight when SIGTERM arrives completes,
    the log says the drain finished, and the exit status is 0 (uvicorn re-raised the signal: 143)."""
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nextscale",
                "serve",
                "--model",
                "demo-fmnist",
                "--port",
                "0",
                "--allocator",
                "system",
            ],
            stderr=log_file,
        )
    try:
        wait_until(
            lambda: proc.poll() is not None or "serving demo-fmnist on" in log_path.read_text(),
            what="the serving line",
        )
        match = re.search(r"serving demo-fmnist on (http://127\.0\.0\.1:\d+) ", log_path.read_text())
        assert match, log_path.read_text()
        url = match.group(1)
        wait_until(lambda: proc.poll() is not None or ready(url), what="/ready")
        body = {"prompt": "bag", "n": 2, "seed": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert json.loads(first[6:])["type"] == "image_generation.partial_image"
            proc.send_signal(signal.SIGTERM)  # the request is in flight: its response has begun, not ended
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert [e["type"] for e in rest].count("image_generation.completed") == 2
        assert proc.wait(120) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert re.search(r"^drained: [01] in-flight requests finished in [\d.]+s$", log, re.M), log
    assert "Traceback" not in log and "error" not in log.lower(), log
