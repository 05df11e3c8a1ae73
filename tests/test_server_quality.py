"""The server's per-request ``quality`` (OpenAI images API field) picks an acceleration preset; requests with
different plans fuse in one engine and each gets the pipeline's image for the same seed and plan."""

from __future__ import annotations

import base64
import io
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.var.family import VARFamily
from nextscale.images import to_uint8_nhwc
from nextscale.pipelines.var import VARPipeline
from nextscale.serve.api import create_app
from nextscale.serve.config import QUALITY_PRESETS, ServerConfig, quality_plans

from .conftest import tiny_pair

PNS = (1, 2, 3, 4, 5, 6)
NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
DEFAULT = "cfg-cutoff:last=1"  # serve --accel: what quality=auto gets


@pytest.fixture(scope="module")
def served():
    var, vae = tiny_pair(4, dict(depth=4, num_classes=5, class_names=NAMES), dict(patch_nums=PNS, ch_mult=(1, 1, 2)))
    refiner, _ = tiny_pair(9, dict(depth=1, num_classes=5), dict(patch_nums=PNS, ch_mult=(1, 1, 2)))
    pipe = VARPipeline(var, vae, channels_last_decoder=False, refiner=refiner)
    assert pipe.plan("fast").uses_refiner, "quality=low runs collaborative decoding in the engine"
    engine = Engine(VARFamily(var, vae, refiner=refiner), EngineConfig(max_images_per_request=3))
    app = create_app(engine, ServerConfig(model_name="tiny"), plans=quality_plans(pipe, DEFAULT))
    with TestClient(app) as client:
        yield client, pipe


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def requests_by_quality(client) -> dict[str, float]:
    prefix = 'nextscale_requests_by_quality_total{quality="'
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return {line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in lines}


def test_mixed_quality_requests_under_random_arrivals_equal_the_pipeline(served):
    client, pipe = served
    before = requests_by_quality(client)  # the app is the module's: other tests' requests count too
    rng = random.Random(0)
    jobs = [
        (rng.choice(["auto", "high", "medium", "low"]), rng.randint(0, 4), rng.randint(1, 3), 40 + i, rng.random() / 20)
        for i in range(12)
    ]

    def post(job):
        quality, label, n, seed, delay = job
        time.sleep(delay)  # requests arrive at random times and join the running engine
        body = {"class_label": label, "n": n, "seed": seed, "cfg": 2.0, "top_k": 20, "quality": quality}
        return client.post("/v1/images/generations", json=body)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, jobs))
    for (quality, label, n, seed, _), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        accel = DEFAULT if quality == "auto" else QUALITY_PRESETS[quality]
        ref = pipe([label] * n, seed=seed, cfg=2.0, top_k=20, output_type="pt", accel=accel)
        for d, want in zip(r.json()["data"], to_uint8_nhwc(ref.images).astype(np.int16)):
            # same tokens; the engine decodes finished requests as a batch: at most one 8-bit level of round-off
            assert np.abs(pixels(d["b64_json"]) - want.squeeze()).max() <= 1, (quality, seed)
    after = requests_by_quality(client)
    for q in {j[0] for j in jobs}:
        assert after[q] - before.get(q, 0) == sum(1 for j in jobs if j[0] == q), q


def test_quality_levels_are_checked_and_exact_is_exact(served):
    client, pipe = served
    r = client.post("/v1/images/generations", json={"prompt": "coat", "quality": "ultra"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "quality"
    high = client.post("/v1/images/generations", json={"prompt": "coat", "seed": 3, "quality": "high"}).json()
    want = to_uint8_nhwc(pipe(["coat"], seed=3, output_type="pt").images)[0].astype(np.int16).squeeze()
    assert np.abs(pixels(high["data"][0]["b64_json"]) - want).max() <= 1
