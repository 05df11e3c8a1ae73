"""The bundled acceleration testbed: VAR's 10-scale schedule, a drafter and its refiner, small enough to ship."""

from __future__ import annotations

import json

import pytest
import torch

from nextscale.config import PATCH_NUMS_256
from nextscale.models.native import bundled_model_dir
from nextscale.pipelines.var import VARPipeline


@pytest.fixture(scope="module")
def testbed() -> VARPipeline:
    return VARPipeline.from_pretrained("testbed-fmnist")


def test_is_small_complete_and_names_its_refiner(testbed):
    folder = bundled_model_dir("testbed-fmnist")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"testbed is {size / 2**20:.1f} MB"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["refiner"] == ["nextscale", "VAR"] and (folder / "quality.json").is_file()
    assert testbed.patch_nums == PATCH_NUMS_256 and testbed.vae.quantize.side == 16
    assert testbed.refiner is not None and testbed.refiner.depth < testbed.transformer.depth


def test_every_preset_runs_on_it_and_code_uses_the_refiner(testbed):
    exact = testbed(["sneaker", "bag"], seed=0, output_type="pt")
    for accel in ("balanced", "fast", "code"):
        out = testbed(["sneaker", "bag"], seed=0, output_type="pt", accel=accel)
        assert out.images.shape == exact.images.shape and torch.isfinite(out.images).all()
        assert out.stats["flops"] < exact.stats["flops"]
    assert testbed.plan("fast").uses_refiner
