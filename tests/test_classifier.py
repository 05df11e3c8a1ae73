"""The small CNN classifier: training on a separable toy set, determinism, FeatureNet outputs, save/load."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nextscale.data import TensorImageDataset
from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.eval.classifier import (
    FEATURE_DIM,
    SmallClassifier,
    load_classifier,
    random_shift,
    save_classifier,
    train_classifier,
)
from nextscale.eval.metrics import FeatureNet


def _patterns(n: int, seed: int, size: int = 16) -> TensorImageDataset:
    """Three classes: horizontal stripes, vertical stripes, checkerboard, with random phase and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.arange(n) % 3
    imgs = np.empty((n, size, size), np.float32)
    for i, c in enumerate(labels):
        p = rng.integers(0, 4)
        base = [(yy + p) // 2 % 2, (xx + p) // 2 % 2, ((yy + p) // 2 + xx // 2) % 2][c]
        imgs[i] = base * 180 + 40 + rng.normal(0, 25, (size, size))
    return TensorImageDataset(imgs.clip(0, 255).astype(np.uint8), labels, ["h", "v", "check"])


@pytest.fixture(scope="module")
def trained() -> tuple[SmallClassifier, float]:
    return train_classifier(_patterns(240, 0), _patterns(90, 1), epochs=2, batch_size=32, seed=0, progress=False)


def test_learns_separable_patterns(trained):
    model, acc = trained
    assert acc >= 0.95
    assert not model.training and model.config.image_size == 16 and model.config.num_classes == 3


def test_training_is_deterministic(trained):
    model, acc = trained
    again, acc2 = train_classifier(_patterns(240, 0), _patterns(90, 1), epochs=2, batch_size=32, seed=0, progress=False)
    assert acc2 == acc
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    state = torch.random.get_rng_state()
    train_classifier(_patterns(60, 0), _patterns(30, 1), epochs=1, batch_size=32, seed=1, progress=False)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_feature_net_interface(trained):
    model, _ = trained
    assert isinstance(model, FeatureNet)
    ds = _patterns(7, 2)
    nhwc = ds.images.permute(0, 2, 3, 1).numpy()
    feats, logits = model.features(nhwc, batch_size=3), model.logits(nhwc)
    assert feats.shape == (7, FEATURE_DIM) and logits.shape == (7, 3)
    assert feats.dtype == logits.dtype == torch.float32 and feats.device.type == logits.device.type == "cpu"
    floats = ds.images.float() / 127.5 - 1
    assert torch.allclose(model.logits(floats), logits, atol=1e-5)
    rgb = np.repeat(nhwc, 3, axis=-1)
    assert torch.allclose(model.logits(rgb), logits, atol=1e-5)  # RGB -> grey by channel mean
    with pytest.raises(InvalidInputError, match="16x16"):
        model.features(np.zeros((1, 32, 32, 1), np.uint8))
    with pytest.raises(InvalidInputError, match="must be uint8 NHWC"):
        model.features(np.zeros((1, 16, 16, 1), np.float32))


def test_save_load_roundtrip(trained, tmp_path: Path):
    model, acc = trained
    folder = save_classifier(model, tmp_path / "clf", metadata={"test_accuracy": acc})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["metadata"] == {"test_accuracy": acc}
    loaded = load_classifier(folder)
    x = _patterns(5, 3).images.permute(0, 2, 3, 1)
    assert torch.equal(loaded.logits(x), model.logits(x))
    save_classifier(loaded, folder)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]  # no temp folders left behind


def test_load_errors(trained, tmp_path: Path):
    model, _ = trained
    with pytest.raises(CheckpointError, match="missing"):
        load_classifier(tmp_path / "nope")
    folder = save_classifier(model, tmp_path / "clf")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_classes": 5}))
    with pytest.raises(CheckpointError, match="does not match the config"):
        load_classifier(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_classifier(folder)


def test_random_shift_moves_content():
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    g = torch.Generator().manual_seed(0)
    y = random_shift(x, 2, g)
    assert y.shape == x.shape and torch.equal(y.sum((1, 2, 3)), x.sum((1, 2, 3)))  # blob stays inside
    assert torch.equal(random_shift(x, 0, g), x)
    assert not all(torch.equal(a, x[0]) for a in random_shift(x, 2, g))


def _fashion_available() -> bool:
    from nextscale.data import find_fashion_mnist

    try:
        find_fashion_mnist()
    except InvalidInputError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _fashion_available(), reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_accuracy():
    from nextscale.data import fashion_mnist

    t0 = time.perf_counter()
    _, acc = train_classifier(fashion_mnist("train"), fashion_mnist("test"), epochs=3, seed=0, progress=False)
    print(f"fashion-mnist classifier: test accuracy {acc:.4f} in {time.perf_counter() - t0:.0f}s")
    assert acc >= 0.90
