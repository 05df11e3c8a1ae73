"""Infinity in the engine and over HTTP: requests of different prompts, sizes and seeds join at any scale and get the
pipeline's bits for their seeds; the server takes prompts (the real ``openai`` client, streaming included), sizes
from the model's templates, ``negative_prompt``; ``nextscale serve`` serves an Infinity folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from nextscale.cli.main import main
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.infinity.family import InfinityCondition
from nextscale.images import to_uint8_nhwc
from nextscale.pipelines.infinity import InfinityPipeline

from .helpers import decode, infinity_app, live, tiny_infinity_pipe

FX = Path(__file__).parent / "fixtures" / "infinity-official"
PROMPTS = [p["prompt"] for p in json.loads((FX / "manifest.json").read_text())["prompts"].values()]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    return tiny_infinity_pipe()


def _app(pipe: InfinityPipeline, **kw):
    return infinity_app(pipe, **kw)


def _bits(bits: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.reshape(b.shape[0], -1, b.shape[-1]) for b in bits], 1)


def test_engine_equals_pipeline_under_random_arrivals(pipe):
    """Requests of different prompts, sizes, image counts, guidance and seeds arrive while others run; each gets the
    pipeline's bits for its seed (the per-scale step is the same code; the cache is a slot of the shared pool)."""
    rng = random.Random(0)
    engine = Engine(pipe.engine_family(), EngineConfig(max_images_per_request=2, kv_cache_mb=64))
    family = engine.family
    sizes = list(family.sizes("0.06M").items())
    todo = []
    for i in range(6):
        size, sched = rng.choice(sizes[:4])
        n, seed = rng.choice([1, 2]), rng.randrange(1000)
        cfg = rng.choice([1.0, 3.0, [1, 3, 3, 2, 2, 1, 1]])
        negative = PROMPTS[2] if i == 3 else None
        params = pipe.sampling_params(cfg=cfg, seed=seed)
        todo.append((InfinityCondition((PROMPTS[i % 2],) * n, sched, negative), params, size))
    ids: dict[str, tuple] = {}
    finals = {}
    while todo or engine.has_unfinished():
        if todo and (not ids or rng.random() < 0.4):
            cond, params, size = todo.pop(0)
            ids[engine.add_request(cond, params)] = (cond, params, size)
        for ev in engine.step():
            if ev.finished:
                finals[ev.request_id] = ev
    assert len(finals) == 6
    for rid, (cond, params, size) in ids.items():
        w, h = (int(v) for v in size.split("x"))
        ref = pipe(list(cond.prompts), cond.negative_prompt, **pipe.call_kwargs(params), size=(h, w), output_type="pt")
        assert torch.equal(_bits(finals[rid].tokens), _bits(ref.bits)), rid
        assert finals[rid].images.shape == ref.images.shape
        assert (finals[rid].images - ref.images).abs().max() <= 1e-4  # decoded in another batch
    assert engine.family.pool.slots == {}, "every slot released"


def test_server_prompts_sizes_and_errors(pipe):
    with TestClient(_app(pipe)) as c:
        info = c.get("/v1/models").json()["data"][0]
        assert info["family"] == "infinity" and info["num_classes"] == 0 and info["num_scales"] == 7
        assert info["qualities"] == {
            "auto": [],
            "high": [],
            "medium": ["cfg-cutoff:last=3", "fastvar:skip="],
            "low": ["cfg-cutoff:last=3", "fastvar"],
        }, "the Infinity presets"
        body = {"prompt": PROMPTS[0], "seed": 3, "size": "352x176", "negative_prompt": PROMPTS[2]}
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        (d,) = r.json()["data"]
        assert d["revised_prompt"] == PROMPTS[0] and d["seed"] == 3
        ref = pipe(PROMPTS[0], PROMPTS[2], seed=3, size=(176, 352), output_type="pt").images
        got = decode(d["b64_json"]).astype(np.int16)
        assert got.shape[:2] == tuple(ref.shape[2:]) and got.shape[1] > got.shape[0]
        assert np.abs(got - to_uint8_nhwc(ref)[0].astype(np.int16)).max() <= 1
        for bad, param, text in [
            ({"prompt": "x", "size": "300x300"}, "size", "size '300x300' is not supported; allowed: "),
            ({"prompt": " "}, "prompt", "prompt must be a non-empty text"),
            ({"class_label": 3}, "class_label", "give the text as `prompt`"),
            ({"prompt": "x", "more_smooth": True}, "more_smooth", "more_smooth is a VAR setting"),
            ({"prompt": "x", "negative_prompt": ""}, "negative_prompt", "must be a non-empty text"),
        ]:
            r = c.post("/v1/images/generations", json=bad)
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["param"] == param and text in err["message"], err


def test_an_openai_client_streams_and_completes(pipe):
    import openai

    with live(_app(pipe)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        out = client.images.generate(
            model="tiny-t2i", prompt=PROMPTS[1], n=2, size="256x256", response_format="b64_json", extra_body={"seed": 9}
        )
        events = list(
            client.images.generate(
                model="tiny-t2i", prompt=PROMPTS[1], n=2, stream=True, partial_images=3, extra_body={"seed": 9}
            )
        )
    ref = to_uint8_nhwc(pipe([PROMPTS[1]] * 2, seed=9, output_type="pt").images).astype(np.int16)
    for d, want in zip(out.data, ref, strict=True):
        assert np.abs(decode(d.b64_json).astype(np.int16) - want).max() <= 1
    kinds = [e.type for e in events]
    assert kinds.count("image_generation.completed") == 2 and kinds.count("image_generation.partial_image") >= 2
    completed = [e.b64_json for e in events if e.type == "image_generation.completed"]
    assert completed == [d.b64_json for d in out.data], "streamed finals are the non-streamed images"


def test_serve_takes_an_infinity_folder(pipe, serve_cli_env, tmp_path, capsys):
    folder = pipe.save_pretrained(tmp_path / "tiny-t2i")
    argv = ["serve", "--model", str(folder), "--port", "0", "--max-images", "1", "--kv-cache-mb", "8"]
    assert main(argv) == 0
    ((app, _, _),) = serve_cli_env
    assert app.state.bridge.engine.family.name == "infinity"
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={"prompt": PROMPTS[0], "seed": 1})
        assert r.status_code == 200, r.text
    assert main([*argv, "--accel", "balanced"]) == 0, "Infinity's own --accel: quality=auto runs its preset"
    assert serve_cli_env[-1][0].state.bridge.engine.family.name == "infinity"
    assert main([*argv, "--speculative", "sjd"]) == 2
    assert "--speculative is an option of raster" in capsys.readouterr().err.strip().splitlines()[-1]
