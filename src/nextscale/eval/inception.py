"""The standard FID network: Inception-v3 with the TensorFlow graph's quirks, as pytorch-fid defines it.

It loads pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the 2015 TF Inception ported to PyTorch)
unchanged: module names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b...``,
``fc.weight`` [1008, 2048]), every conv is bias-free and followed by BatchNorm (eps 0.001) and ReLU, and four
blocks differ from torchvision's to match TF: average pools that ignore padding in ``Mixed_5*``, ``Mixed_6b-e``
and ``Mixed_7b``, and a max pool in ``Mixed_7c``'s pool branch. The weights are never downloaded: the user
supplies the file. Images: any size, grey or RGB, resized to 299x299 (bilinear, align_corners=False) and scaled
to [-1, 1]; outputs are the 2048-d pool3 features (FID, precision/recall) and the 1008 logits (IS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.eval.metrics import ArrayLike, float_nchw, uint8_nhwc_to_float01
from nextscale.models.weights import read_state_dict

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_INPUT_SIZE = 299
FID_NUM_CLASSES = 1008
FID_FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Bias-free conv + BatchNorm (eps 0.001, as TF) + ReLU."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average that divides by the number of real (not padded) pixels, as TF's pool does."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3, strided double 3x3 and max pool -> 480 + c_in."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b-e): factorised 7x7 convolutions with ``c7`` inner channels -> 768 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and max pool -> 512 + c_in."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    """8x8 block: 1x1, split 3x3, double split 3x3 and pool branches -> 2048 channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_1(_InceptionE):
    """Mixed_7b: the pool branch averages without counting padding."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return _avg_pool_no_pad(x)


class FIDInceptionE_2(_InceptionE):
    """Mixed_7c: the pool branch is a 3x3 max pool (the TF graph's quirk)."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInception3(nn.Module):
    """Inception-v3 of the FID reference; ``forward`` takes [N, 3, 299, 299] in [-1, 1]."""

    def __init__(self, num_classes: int = FID_NUM_CLASSES):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(FID_FEATURE_DIM, num_classes)

    def forward(self, x_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pool3 features [N, 2048], logits [N, num_classes])."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x_N3HW)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool_ND = x.mean(dim=(2, 3))
        return pool_ND, self.fc(pool_ND)


def preprocess(images: ArrayLike) -> torch.Tensor:
    """uint8 NHWC (or float NCHW in [0, 1]), any size, 1 or 3 channels -> float [N, 3, 299, 299] in [-1, 1]."""
    if isinstance(images, np.ndarray) or images.dtype == torch.uint8:
        x = uint8_nhwc_to_float01(images)
    else:
        x = float_nchw(images, "[0, 1]")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.mul(2).sub(1)


def _expected_entries(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_fid_inception(path: str | Path) -> FIDInception3:
    """Load pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` strictly (every tensor present, same shape,
    nothing extra; ``num_batches_tracked`` counters optional), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such file; the FID Inception weights, pytorch-fid's {FID_WEIGHTS_NAME}, "
            f"must be supplied by you (nextscale never downloads weights)"
        )
    sd = read_state_dict(path)
    model = FIDInception3()
    expected = _expected_entries(model)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not k.endswith("num_batches_tracked")]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in expected.items() if k in sd and sd[k].shape != s
    ]
    hint = ""
    if "fc.weight" in sd and sd["fc.weight"].shape[0] == 1000:
        hint = " (1000 classes: torchvision's ImageNet Inception-v3, not the FID network)"
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            raise CheckpointError(
                f"{path}: not the FID Inception-v3 ({FID_WEIGHTS_NAME}){hint}: {what} tensors: "
                f"{', '.join(items[:5])}{more}"
            )
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return model.eval()


class InceptionFeatures:
    """``FeatureNet`` over the FID Inception: pool3 features (2048) and logits (1008), in batches."""

    def __init__(self, model: FIDInception3, device: str | torch.device = "cpu", batch_size: int = 50):
        self.model, self.device, self.batch_size = model.eval().to(device), torch.device(device), batch_size

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 50) -> InceptionFeatures:
        return cls(load_fid_inception(path), device, batch_size)

    def features_and_logits(
        self, images: ArrayLike, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for both outputs: ([N, 2048], [N, 1008]) float32 on the CPU."""
        bs = batch_size or self.batch_size
        if bs < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {bs}")
        feats, logits = [], []
        with torch.inference_mode():
            for lo in range(0, len(images), bs):
                f, g = self.model(preprocess(images[lo : lo + bs]).to(self.device))
                feats.append(f.float().cpu())
                logits.append(g.float().cpu())
        if not feats:
            raise InvalidInputError("no images given")
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: ArrayLike, batch_size: int | None = None) -> torch.Tensor:
        return self.features_and_logits(images, batch_size)[0]

    def logits(self, images: ArrayLike, batch_size: int | None = None) -> torch.Tensor:
        return self.features_and_logits(images, batch_size)[1]
