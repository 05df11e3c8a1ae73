"""What a Ray Serve replica builds on, without Ray: the API app called in-process (lifespan, JSON and SSE responses,
a caller that goes away cancels its request) and the router's pure parts (seed pinning, the metrics merge, replica
settings and resources)."""

from __future__ import annotations

import asyncio
import json

import pytest

from nextscale.errors import ConfigError
from nextscale.serve.inprocess import InProcessApp
from nextscale.serve.replicas import ReplicaSettings, merge_metrics, pinned_seed, replica_resources

from .helpers import var_app

JSON = [("content-type", "application/json")]


def _body(obj: dict) -> bytes:
    return json.dumps(obj).encode()


async def _collect(app: InProcessApp, method: str, path: str, body: bytes = b"") -> tuple[int, dict, list[bytes]]:
    it = app.request(method, path, "", JSON, body)
    status, headers = await it.__anext__()
    return status, dict(headers), [c async for c in it]


def test_the_app_in_process_answers_as_over_http(tiny):
    async def run() -> None:
        app = InProcessApp(var_app(*tiny))
        await app.start()  # the warm-up generation ran: /ready says yes
        status, _, body = await _collect(app, "GET", "/ready")
        assert status == 200 and json.loads(b"".join(body)) == {"status": "ready"}
        status, headers, body = await _collect(app, "POST", "/v1/images/generations", _body({"prompt": "1", "seed": 3}))
        assert status == 200 and headers["content-type"] == "application/json"
        assert len(json.loads(b"".join(body))["data"]) == 1
        status, _, body = await _collect(app, "POST", "/v1/images/generations", _body({"prompt": "1", "n": 99}))
        assert status == 422 and "n=99" in json.loads(b"".join(body))["error"]["message"]
        # SSE: one chunk per scale as the engine produces them, then [DONE]
        body = _body({"prompt": "1", "seed": 3, "stream": True})
        status, headers, chunks = await _collect(app, "POST", "/v1/images/generations", body)
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert len(chunks) > 2 and chunks[-1] == b"data: [DONE]\n\n"
        assert b"image_generation.completed" in b"".join(chunks)
        await app.stop()  # the drain: the engine thread ends
        assert not app.app.state.bridge.alive

    asyncio.run(run())


def test_a_caller_that_goes_away_cancels_its_request(tiny):
    async def run() -> None:
        app = InProcessApp(var_app(*tiny))
        await app.start()
        bridge = app.app.state.bridge
        it = app.request("POST", "/v1/images/generations", "", JSON, _body({"prompt": "2", "stream": True}))
        status, _ = await it.__anext__()
        assert status == 200
        await it.__anext__()  # the first scale's event: the request is running
        await it.aclose()  # the router's client disconnected
        for _ in range(200):  # the engine drops the request at its next iteration
            if not bridge._handles:
                break
            await asyncio.sleep(0.05)
        assert not bridge._handles, "the request was cancelled"
        await app.stop()

    asyncio.run(run())


def test_pinned_seed_fixes_a_seed_only_where_there_is_none():
    got = json.loads(pinned_seed(_body({"prompt": "bag"})))
    assert isinstance(got["seed"], int) and 0 <= got["seed"] < 2**63
    assert json.loads(pinned_seed(_body({"prompt": "bag", "seed": None})))["seed"] is not None
    kept = _body({"prompt": "bag", "seed": 5})
    assert pinned_seed(kept) == kept
    for raw in (b"not json", b"[1, 2]", b"\xff\xfe", b""):  # the replica answers these (422/415)
        assert pinned_seed(raw) == raw


def test_metrics_merge_labels_every_sample_with_its_replica():
    one = '# HELP q queue\n# TYPE q gauge\nq 3.0\n# HELP r total\n# TYPE r counter\nr_total{status="ok"} 2.0\n'
    two = "# HELP q queue\n# TYPE q gauge\nq 1.0\n"
    text = merge_metrics([("a", one), ("b", two)], "router_x 1\n")
    lines = text.splitlines()
    assert 'q{replica="a"} 3' in lines and 'q{replica="b"} 1' in lines
    assert 'r_total{replica="a",status="ok"} 2' in lines
    assert lines.count("# TYPE q gauge") == 1 and lines[-1] == "router_x 1"
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families["q"].samples) == 2, "the merge parses back"


def test_replica_settings_and_resources():
    opts = ReplicaSettings(replicas=3, max_ongoing=7).deployment_options()
    assert opts["num_replicas"] == 3 and opts["max_ongoing_requests"] == 7 and "autoscaling_config" not in opts
    auto = ReplicaSettings(replicas=2, min_replicas=1, max_replicas=4, target_ongoing=3).deployment_options()
    assert auto["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 3,
    }
    assert ReplicaSettings(num_gpus=1).deployment_options()["ray_actor_options"] == {"num_gpus": 1}
    with pytest.raises(ConfigError, match="go together"):
        ReplicaSettings(min_replicas=1)
    with pytest.raises(ConfigError, match="0 <= --min-replicas <= --max-replicas"):
        ReplicaSettings(min_replicas=3, max_replicas=2)
    assert replica_resources(2, {"CPU": 8.0, "GPU": 4.0}) == (1.0, 0.0, 4)  # one GPU each
    assert replica_resources(2, {"CPU": 8.0}) == (0.0, 4.0, 4)  # a share of the CPUs, threads to match
    assert replica_resources(4, {"CPU": 2.0}) == (0.0, 1.0, 1)  # at least one CPU each
