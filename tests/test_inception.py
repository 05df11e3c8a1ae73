"""The FID Inception-v3: architecture size, strict loading of pytorch-fid's file layout, preprocessing, outputs.

The real weights are not available offline; a random state dict in the same layout stands in for them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.eval.inception import (
    FID_WEIGHTS_NAME,
    FIDInception3,
    InceptionFeatures,
    load_fid_inception,
    preprocess,
)
from nextscale.eval.metrics import FeatureNet

# torchvision's Inception3 without the auxiliary head has 21,785,568 parameters before the classifier (its
# 1000-class total 23,834,568 minus fc 2048*1000+1000); the FID network's fc has 1008 outputs.
BACKBONE_PARAMS = 21_785_568
FC_PARAMS = 2048 * 1008 + 1008


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    """A state dict in the FID file's layout with non-degenerate weights and BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in FIDInception3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # the official file may or may not carry them
        if k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("running_mean", "bn.bias")):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel() if v.ndim > 1 else 1
            sd[k] = torch.randn(v.shape, generator=g) * (2 / fan_in) ** 0.5
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _random_state(0)
    path = tmp_path_factory.mktemp("fid") / FID_WEIGHTS_NAME
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def net(weights) -> InceptionFeatures:
    return InceptionFeatures.from_file(weights[0], batch_size=2)


def test_parameter_count_and_layout():
    model = FIDInception3()
    assert sum(p.numel() for p in model.parameters()) == BACKBONE_PARAMS + FC_PARAMS == 23_850_960
    sd = model.state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and "Conv2d_1a_3x3.conv.bias" not in sd
    assert {"Mixed_5b.branch_pool.bn.running_var", "Mixed_7c.branch3x3dbl_3b.conv.weight"} <= set(sd)
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_load_applies_every_tensor(weights):
    path, sd = weights
    model = load_fid_inception(path)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_outputs_grey_and_rgb(net: InceptionFeatures):
    assert isinstance(net, FeatureNet) and isinstance(net.model, FIDInception3)
    grey = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)[..., None]
    feats, logits = net.features_and_logits(grey)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all() and torch.isfinite(logits).all()
    assert (feats >= 0).all()  # pool3 averages ReLU outputs
    assert not torch.allclose(feats[0], feats[1])
    alone = net.features(grey[:1], batch_size=1)  # batch composition does not matter (up to float round-off)
    assert torch.allclose(alone[0], feats[0], rtol=1e-4, atol=1e-5)
    rgb = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
    assert net.logits(rgb).shape == (1, 1008)


def test_forward_is_deterministic(net):
    x = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1  # small: the net takes >= 75
    with torch.inference_mode():
        a, b = net.model(x), net.model(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_preprocess():
    grey = torch.full((1, 10, 12, 1), 255, dtype=torch.uint8)
    x = preprocess(grey)
    assert x.shape == (1, 3, 299, 299) and torch.allclose(x, torch.ones_like(x))
    floats = torch.zeros(2, 3, 64, 64)
    assert torch.allclose(preprocess(floats), -torch.ones(2, 3, 299, 299))
    ramp = torch.linspace(0, 1, 8).repeat(1, 3, 8, 1)
    expected = torch.nn.functional.interpolate(ramp, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    assert torch.allclose(preprocess(ramp), expected)
    with pytest.raises(InvalidInputError, match="NCHW"):
        preprocess(torch.zeros(2, 64, 64, 3))
    with pytest.raises(InvalidInputError, match="C = 1 or 3"):
        preprocess(np.zeros((2, 8, 8, 4), np.uint8))


def test_strict_loading_errors(weights, tmp_path: Path):
    _, sd = weights
    missing = tmp_path / "nothing-here.pth"
    with pytest.raises(CheckpointError, match=rf"no such file.*{re.escape(FID_WEIGHTS_NAME)}.*supplied by you"):
        load_fid_inception(missing)
    partial = dict(sd)
    del partial["Mixed_6c.branch7x7_2.conv.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial\.pth.*missing tensors: Mixed_6c\.branch7x7_2\.conv\.weight"):
        load_fid_inception(tmp_path / "partial.pth")
    torchvision_like = {**sd, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(torchvision_like, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match=r"torchvision's ImageNet.*wrong shape tensors: fc\.weight"):
        load_fid_inception(tmp_path / "tv.pth")
    extra = {**sd, "AuxLogits.fc.weight": torch.zeros(1000, 768)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: AuxLogits\.fc\.weight"):
        load_fid_inception(tmp_path / "extra.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pth: not a readable PyTorch checkpoint"):
        load_fid_inception(tmp_path / "garbage.pth")


def test_num_batches_tracked_is_optional(weights, tmp_path: Path):
    _, sd = weights
    with_counters = {
        **sd,
        **{k: torch.tensor(7) for k in FIDInception3().state_dict() if k.endswith("num_batches_tracked")},
    }
    torch.save(with_counters, tmp_path / "counters.pth")
    model = load_fid_inception(tmp_path / "counters.pth")
    assert torch.equal(model.state_dict()["fc.weight"], sd["fc.weight"])
