"""The bundled Fashion-MNIST model: loads with no arguments, obeys class names, and makes recognisable items."""

from __future__ import annotations

import json

import pytest

from nextscale.eval.classifier import load_classifier
from nextscale.jobs.quality import balanced_subset, conditional_quality, reconstruction_quality, sample_per_class
from nextscale.models.native import bundled_model_dir
from nextscale.pipelines.var import VARPipeline

from .helpers import FMNIST


@pytest.fixture(scope="module")
def pipe() -> VARPipeline:
    return VARPipeline.from_pretrained()


def test_bundled_model_is_small_and_complete():
    folder = bundled_model_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"bundled model is {size / 2**20:.1f} MB"
    for name in (
        "model_index.json",
        "transformer/model.safetensors",
        "vae/model.safetensors",
        "classifier/model.safetensors",
        "quality.json",
        "build.json",
    ):
        assert (folder / name).is_file(), name


def test_loads_with_no_argument_and_knows_its_classes(pipe):
    assert pipe.class_names == FMNIST and pipe.image_size == 32 and pipe.vae.cfg.in_channels == 1
    out = pipe(["sneaker", "ankle boot"], seed=0)
    assert out.labels == [7, 9] and out.images[0].mode == "L" and out.images[0].size == (32, 32)


def test_samples_are_recognisable_by_the_shipped_classifier(pipe):
    clf = load_classifier(bundled_model_dir() / "classifier")
    samples, labels = sample_per_class(pipe, 10, pipe.sampling_params(seed=123))
    acc = (clf.logits(samples).argmax(-1).numpy() == labels).mean()
    assert acc >= 0.85, f"only {acc:.0%} of 100 samples classified as their class"


def test_reconstruction_quality_is_the_floor_a_tokenizer_sets(pipe):
    """A tokenizer that returns its input costs nothing (the real train-vs-test distance, ratio 1); the shipped one
    costs about what was measured at 150 per class (25.6 dB, 6.0x)."""
    import torch

    from nextscale.data import load_dataset

    class Identity:
        def img_to_recon(self, x: torch.Tensor) -> torch.Tensor:
            return x

    clf = load_classifier(bundled_model_dir() / "classifier")
    train, test = load_dataset("fashion-mnist", "train", 32), load_dataset("fashion-mnist", "test", 32)
    real_train = balanced_subset(train.images, train.labels, 40, 10)
    real_test = balanced_subset(test.images, test.labels, 40, 10)
    same = reconstruction_quality(Identity(), clf, real_train, real_test)
    # the same images, so the same distance up to the matrix square root's round-off (3.5e-8 measured)
    assert same["fd_ratio"] == pytest.approx(1.0, abs=1e-6) and same["psnr"] == float("inf")
    assert same["class_accuracy"] == pytest.approx(
        (clf.logits(real_train[0]).argmax(-1).numpy() == real_train[1]).mean()
    )
    shipped = reconstruction_quality(pipe.vae, clf, real_train, real_test)
    assert 24.0 < shipped["psnr"] < 28.0 and shipped["fd_ratio"] > 1.5, shipped


@pytest.mark.slow
def test_quality_with_default_settings_is_as_recorded(pipe):
    """150 samples per class with the shipped defaults: >= 95 % classified as requested, and accuracy and
    Frechet distance as ``quality.json`` records them. (The issue's Frechet target, <= 5x the real-vs-real
    distance, is not met: this tokenizer's reconstructions alone are ~6x in the classifier's feature space.)"""
    from nextscale.data import load_dataset

    clf = load_classifier(bundled_model_dir() / "classifier")
    train, test = load_dataset("fashion-mnist", "train", 32), load_dataset("fashion-mnist", "test", 32)
    real_train = balanced_subset(train.images, train.labels, 150, 10)
    real_test = balanced_subset(test.images, test.labels, 150, 10)
    params = pipe.sampling_params(seed=0)
    report = conditional_quality(pipe, clf, real_train, real_test, [params], 150)
    r = report["settings"][0]
    recorded = json.loads((bundled_model_dir() / "quality.json").read_text())
    same = [
        s
        for s in recorded["settings"]
        if (s["cfg"], s["top_k"], s["top_p"]) == (params.cfg, params.top_k, params.top_p)
    ]
    assert same, "the default setting is one of the recorded ones"
    # quality.json records what the shipped weights produce (a token may flip with another thread count)
    assert abs(same[0]["class_accuracy"] - r["class_accuracy"]) <= 3 / 1500, (same[0], r)
    assert abs(same[0]["fd_ratio"] - r["fd_ratio"]) <= 0.05 * same[0]["fd_ratio"], (same[0], r)
    assert r["class_accuracy"] >= 0.95, r
