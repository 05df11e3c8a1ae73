"""Class-conditional sample quality against a labelled dataset, in one feature network's space.

For each setting: N samples per class (per-image seeds), the share the network classifies as the requested
class, and the Fréchet distance to N real test images per class — reported with the real-train vs real-test
distance at the same count, because Fréchet distances are biased by sample count and only comparable at
equal counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nextscale.engine.var.params import SamplingParams
from nextscale.eval.evaluate import evaluate
from nextscale.eval.metrics import FeatureNet
from nextscale.images import to_uint8_nhwc
from nextscale.pipelines.var import VARPipeline


def balanced_subset(
    images_NCHW: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of every class, as uint8 NHWC + labels."""
    idx = torch.cat([torch.nonzero(labels == c).view(-1)[:per_class] for c in range(num_classes)])
    imgs = images_NCHW[idx]
    return imgs.permute(0, 2, 3, 1).contiguous().numpy(), labels[idx].numpy()


@torch.inference_mode()
def sample_per_class(
    pipe: VARPipeline, per_class: int, params: SamplingParams, batch_size: int = 250
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(pipe.num_classes), per_class)
    out = []
    for i in range(0, len(labels), batch_size):
        chunk = labels[i : i + batch_size]
        res = pipe(
            chunk.tolist(),
            cfg=params.cfg,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            more_smooth=params.more_smooth,
            output_type="pt",
            image_indices=range(i, i + len(chunk)),
        )
        out.append(to_uint8_nhwc(res.images))
    return np.concatenate(out), labels


def conditional_quality(
    pipe: VARPipeline,
    net: FeatureNet,
    real_train: tuple[np.ndarray, np.ndarray],
    real_test: tuple[np.ndarray, np.ndarray],
    settings: list[SamplingParams],
    per_class: int,
    net_name: str = "classifier",
) -> dict[str, Any]:
    """Accuracy and Fréchet distance of ``per_class`` samples per class for each sampling setting."""
    nc = pipe.num_classes
    real = evaluate(real_train[0], real_test[0], net, real_train[1], net_name, num_classes=nc)
    fd_key = f"FD-{net_name}"
    report: dict[str, Any] = {
        "per_class": per_class,
        "images": per_class * nc,
        "real_train_vs_test": {fd_key: real[fd_key], "class_accuracy": real["class_accuracy"]},
        "settings": [],
    }
    for params in settings:
        samples, labels = sample_per_class(pipe, per_class, params)
        r = evaluate(samples, real_test[0], net, labels, net_name, num_classes=nc)
        r.update(
            {
                "cfg": params.cfg,
                "top_k": params.top_k,
                "top_p": params.top_p,
                "seed": params.seed,
                "fd_ratio": r[fd_key] / real[fd_key],
            }
        )
        report["settings"].append(r)
    return report
