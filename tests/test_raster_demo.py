"""The bundled raster model (``demo-fmnist-raster``): loads by name, knows its classes, makes recognisable items
exactly and with speculative decoding, and ``nextscale serve --model demo-fmnist-raster`` serves it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from nextscale import LlamaGenPipeline
from nextscale.cli.main import main
from nextscale.eval.classifier import load_classifier
from nextscale.images import to_uint8_nhwc
from nextscale.models.native import bundled_model_dir

from .helpers import FMNIST, decode

NAME = "demo-fmnist-raster"


@pytest.fixture(scope="module")
def pipe() -> LlamaGenPipeline:
    return LlamaGenPipeline.from_pretrained(NAME)


def test_bundled_raster_model_is_small_and_complete():
    folder = bundled_model_dir(NAME)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 12 * 2**20, f"bundled raster model is {size / 2**20:.1f} MB"
    for name in ("model_index.json", "transformer/model.safetensors", "vae/model.safetensors", "quality.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "LlamaGenPipeline"


def test_loads_by_name_with_a_16x16_grid_and_knows_its_classes(pipe):
    assert pipe.class_names == FMNIST and pipe.image_size == 32 and pipe.transformer.cfg.grid_size == 16
    out = pipe(["sneaker", "bag"], seed=0)
    assert out.labels == [7, 8] and out.images[0].mode == "L" and out.images[0].size == (32, 32)
    assert out.tokens.shape == (2, 256)


@pytest.mark.parametrize("speculative", [None, "balanced", "fast"])
def test_samples_are_recognisable_exactly_and_with_speculative_decoding(pipe, speculative):
    clf = load_classifier(bundled_model_dir() / "classifier")
    labels = list(range(10)) * 5
    out = pipe(labels, seed=123, output_type="pt", speculative=speculative)
    acc = (clf.logits(to_uint8_nhwc(out.images)).argmax(-1).numpy() == np.array(labels)).mean()
    assert acc >= 0.75, f"only {acc:.0%} of 50 samples classified as their class ({speculative})"
    if speculative is not None:
        assert out.stats["forward_passes"] < 256 / 1.5, out.stats


def test_gsd_at_its_default_groups_codes_where_sjd_would_not(pipe):
    """GSD is lossy: at its default distance (the codebook's own neighbourhood) it keeps guesses SJD refuses, so with
    the same seeds most images differ from SJD's. With a distance below every code pair's (the official 0.5 is
    nearly that on this codebook) the group is the guess alone and the tokens are SJD's exactly."""
    labels = list(range(10))
    sjd = pipe(labels, seed=0, speculative="sjd", output_type="latent").tokens
    gsd = pipe(labels, seed=0, speculative="gsd", output_type="latent").tokens
    alone = pipe(labels, seed=0, speculative="gsd:dist=1e-9", output_type="latent").tokens
    assert torch.equal(alone, sjd)
    differ = int((gsd != sjd).any(dim=1).sum())
    assert differ >= 5, f"only {differ} of 10 images differ from SJD's"


def test_serve_by_name_equals_the_pipeline_exactly_and_speculatively(serve_cli_env, pipe):
    assert main(["serve", "--model", NAME, "--port", "0"]) == 0
    ((app, _, _),) = serve_cli_env
    with TestClient(app) as c:
        info = c.get("/v1/models").json()["data"][0]
        assert info["id"] == NAME and info["family"] == "raster" and info["classes"] == list(FMNIST)
        for quality, spec in (("high", None), ("medium", "balanced")):
            r = c.post("/v1/images/generations", json={"prompt": "Bag", "n": 2, "seed": 3, "quality": quality})
            assert r.status_code == 200, r.text
            want = to_uint8_nhwc(pipe([8, 8], seed=3, speculative=spec, output_type="pt").images).astype(np.int16)
            for d, w in zip(r.json()["data"], want, strict=True):
                got = decode(d["b64_json"]).astype(np.int16)  # a grey PNG: [H, W]
                assert np.abs(got - w.reshape(got.shape)).max() <= 1
