"""The HTTP API serving a raster (LlamaGen) model: the same endpoints and behaviour as for VAR (tests/test_server.py)
— generations equal the pipeline, SSE previews are the rows decoded so far, validation, 429, disconnects, drain,
metrics, ``nextscale serve --model <raster folder>``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from nextscale.cli.main import main
from nextscale.engine.engine import EngineConfig
from nextscale.engine.var.plan import RequestPlan
from nextscale.errors import InvalidInputError
from nextscale.images import to_uint8_nhwc
from nextscale.serve.config import quality_plans

from .conftest import RASTER_GRID, tiny_raster_pipe
from .helpers import decode, live, raster_app

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = tuple(f"class-{i}" for i in range(10))


@pytest.fixture(scope="module")
def pipe():
    p = tiny_raster_pipe()
    p.set_class_names(NAMES)
    return p


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(raster_app(pipe)) as c:
        yield c


def pixels(b64: str) -> np.ndarray:
    return decode(b64).astype(np.int16)


def assert_images(data: list[dict], ref_images: torch.Tensor) -> None:
    """Same tokens; the engine decodes the requests finishing together as a batch: at most one 8-bit level off."""
    for d, want in zip(data, to_uint8_nhwc(ref_images).astype(np.int16), strict=True):
        assert np.abs(pixels(d["b64_json"]) - want).max() <= 1


def test_health_ready_models_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    info = client.get("/v1/models").json()["data"][0]
    assert info["id"] == "tiny-raster" and info["family"] == "raster" and info["classes"] == list(NAMES)
    assert info["image_size"] == 8 and info["num_scales"] == RASTER_GRID and info["num_classes"] == 10
    assert info["step_unit"] == "row"  # the playground labels its progress by it
    text = client.get("/metrics").text
    for name in ("nextscale_queue_depth", "nextscale_tokens_per_iteration_bucket", "nextscale_request_latency"):
        assert name in text


def test_generation_equals_the_pipeline_with_the_models_defaults(client, pipe):
    r = client.post("/v1/images/generations", json={"prompt": "class-3", "n": 2, "seed": 7, "cfg": 2.0, "top_k": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["revised_prompt"] for d in body["data"]] == ["class-3"] * 2
    assert body["usage"] == {"images": 2, "tokens": 2 * RASTER_GRID * RASTER_GRID}
    assert_images(body["data"], pipe([3, 3], seed=7, cfg=2.0, top_k=20, output_type="pt").images)
    # Fields left out take the model's recommended settings (cfg 4, top-k 2000), not the body's VAR defaults;
    # top_p 0 is "off" as for VAR (1.0 in LlamaGen's convention).
    r = client.post("/v1/images/generations", json={"class_label": 5, "seed": 2, "top_p": 0})
    assert_images(r.json()["data"], pipe([5], seed=2, output_type="pt").images)


def test_stream_sends_the_rows_so_far_then_the_final_images(client, pipe):
    body = {"class_label": 1, "n": 2, "seed": 4, "stream": True}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    rows = RASTER_GRID - 1  # a preview per completed row but the last, whose images are the final ones
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 * rows + [
        "image_generation.completed"
    ] * 2
    assert [e["scale"] for e in events] == [r for r in range(RASTER_GRID) for _ in range(2)]
    assert {e["num_scales"] for e in events} == {RASTER_GRID}
    previews: list[torch.Tensor] = []
    pipe([1, 1], seed=4, output_type="pt", callback_on_rows=lambda _, x: previews.append(x))
    for r in range(rows):
        assert_images(events[2 * r : 2 * r + 2], previews[r])
    final = client.post("/v1/images/generations", json={"class_label": 1, "n": 2, "seed": 4}).json()
    assert [e["b64_json"] for e in events[-2:]] == [d["b64_json"] for d in final["data"]]


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"prompt": "coat"}, "prompt", "unknown class 'coat'"),
        ({"prompt": "class-1", "more_smooth": True}, "more_smooth", "more_smooth is a VAR setting"),
        ({"prompt": "class-1", "top_k": 100}, "top_k", "exceeds the codebook size 64"),
        ({"prompt": "class-1", "n": 5}, "n", "n=5 is too large: allowed 1..4"),
        ({"prompt": "class-1", "size": "256x256"}, "size", "this model makes 8x8 images"),
    ],
)
def test_invalid_bodies_get_422_naming_the_field(client, body, param, text):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"], err


def test_quality_picks_speculative_decoding_and_images_equal_the_pipelines(pipe):
    """quality=high is exact, medium MC-SJD (the balanced preset), low the fast preset; auto runs serve --speculative's
    method. Each gives the pipeline's images for that method and seed."""
    app = raster_app(pipe, plans=quality_plans(pipe, "sjd:window=3,init=repeat"))
    methods = {"auto": "sjd:window=3,init=repeat", "high": None, "medium": "balanced", "low": "fast"}
    # what each level resolved to on this model, as reported: the spec that rebuilds it (defaults left out)
    reported = {
        "auto": ["sjd:window=3,init=repeat"],
        "high": [],
        "medium": ["mcsjd:window=32"],
        "low": ["sjd-pac:window=32"],
    }
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["data"][0]["qualities"] == reported
        for quality, spec in methods.items():
            body = {"prompt": "class-2", "n": 2, "seed": 9, "top_k": 8, "quality": quality}
            r = c.post("/v1/images/generations", json=body)
            assert r.status_code == 200, r.text
            assert (r.json()["quality"], r.json()["acceleration"]) == (quality, reported[quality])
            want = pipe([2, 2], seed=9, top_k=8, speculative=spec, output_type="pt").images
            assert_images(r.json()["data"], want)


def test_a_raster_server_refuses_var_plans(pipe):
    with pytest.raises(InvalidInputError, match=r"quality 'low': a raster request runs exact or with a Specul"):
        raster_app(pipe, plans={"low": RequestPlan.exact(4)})


def test_an_openai_client_gets_images(pipe):
    """The official ``openai`` package (a dev dependency) against the live server."""
    import openai

    with live(raster_app(pipe)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        out = client.images.generate(
            model="tiny-raster", prompt="class-4", n=2, size="8x8", response_format="b64_json", extra_body={"seed": 5}
        )
    assert len(out.data) == 2 and all(d.b64_json for d in out.data)
    assert_images([{"b64_json": d.b64_json} for d in out.data], pipe([4, 4], seed=5, output_type="pt").images)


def test_serve_takes_a_raster_folder_with_speculative_and_refuses_accel(serve_cli_env, pipe, tmp_path, capsys):
    folder = pipe.save_pretrained(tmp_path / "tiny-raster")
    assert main(["serve", "--model", str(folder), "--port", "0", "--max-images", "2", "--kv-cache-mb", "1"]) == 0
    ((app, _, _),) = serve_cli_env
    engine = app.state.bridge.engine
    assert engine.family.name == "raster" and engine.cfg == EngineConfig(kv_cache_mb=1, max_images_per_request=2)
    with TestClient(app) as c:
        info = c.get("/v1/models").json()["data"][0]
        assert info["id"] == "tiny-raster" and info["classes"] == list(NAMES)
        r = c.post("/v1/images/generations", json={"prompt": "class-6", "seed": 1})
        assert r.status_code == 200, r.text
        assert_images(r.json()["data"], pipe([6], seed=1, output_type="pt").images)
    assert main(["serve", "--model", str(folder), "--port", "0", "--accel", "fast"]) == 2
    assert "--accel is an option of VAR (next-scale) models" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["serve", "--model", str(folder), "--port", "0", "--speculative", "lantern:window=4,k=9"]) == 0
    app = serve_cli_env[-1][0]
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={"prompt": "class-6", "seed": 1})
        assert r.status_code == 200, r.text
        want = pipe([6], seed=1, speculative="lantern:window=4,k=9", output_type="pt").images
        assert_images(r.json()["data"], want)
    assert main(["serve", "--model", str(folder), "--port", "0", "--speculative", "nope"]) == 2
    assert "unknown speculative method 'nope'" in capsys.readouterr().err.strip().splitlines()[-1]
