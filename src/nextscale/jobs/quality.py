"""Class-conditional sample quality against a labelled dataset, in one feature network's space.

For each setting: N samples per class (per-image seeds), the share the network classifies as the requested
class, and the Fréchet distance to N real test images per class — reported with the real-train vs real-test
distance at the same count, because Fréchet distances are biased by sample count and only comparable at
equal counts. Any family's pipeline samples (``jobs.SamplingPipeline``), each setting given as one of its params
objects (``pipe.sampling_params(...)``); the report names settings by the pipeline's call keywords (``cfg``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nextscale.data import psnr
from nextscale.engine.params import SeededParams
from nextscale.eval.evaluate import evaluate
from nextscale.eval.metrics import FeatureNet
from nextscale.images import to_uint8_nhwc
from nextscale.jobs import SamplingPipeline


def balanced_subset(
    images_NCHW: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of every class, as uint8 NHWC + labels."""
    idx = torch.cat([torch.nonzero(labels == c).view(-1)[:per_class] for c in range(num_classes)])
    imgs = images_NCHW[idx]
    return imgs.permute(0, 2, 3, 1).contiguous().numpy(), labels[idx].numpy()


@torch.inference_mode()
def sample_per_class(
    pipe: SamplingPipeline, per_class: int, params: SeededParams, batch_size: int = 250
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every class (image g seeded by (seed, g)) as uint8 NHWC, and their labels; sampled
    ``batch_size`` at a time (the images do not depend on it)."""
    labels = np.repeat(np.arange(pipe.num_classes), per_class)
    settings = pipe.call_kwargs(params)
    out = []
    for i in range(0, len(labels), batch_size):
        chunk = labels[i : i + batch_size]
        res = pipe(chunk.tolist(), **settings, output_type="pt", image_indices=range(i, i + len(chunk)))
        out.append(to_uint8_nhwc(res.images))
    return np.concatenate(out), labels


def conditional_quality(
    pipe: SamplingPipeline,
    net: FeatureNet,
    real_train: tuple[np.ndarray, np.ndarray],
    real_test: tuple[np.ndarray, np.ndarray],
    settings: Sequence[SeededParams],
    per_class: int,
    net_name: str = "classifier",
    batch_size: int = 250,
) -> dict[str, Any]:
    """Accuracy and Fréchet distance of ``per_class`` samples per class for each sampling setting; each setting's
    row also names it (``cfg``, ``top_k``, ``top_p``, ``seed``: the pipeline's call keywords)."""
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
        samples, labels = sample_per_class(pipe, per_class, params, batch_size)
        r = evaluate(samples, real_test[0], net, labels, net_name, num_classes=nc)
        kw = pipe.call_kwargs(params)
        r.update({k: kw[k] for k in ("cfg", "top_k", "top_p", "seed")})
        r["fd_ratio"] = r[fd_key] / real[fd_key]
        report["settings"].append(r)
    return report


@torch.inference_mode()
def reconstruction_quality(
    vae: Any,
    net: FeatureNet,
    real_train: tuple[np.ndarray, np.ndarray],
    real_test: tuple[np.ndarray, np.ndarray],
    net_name: str = "classifier",
    batch_size: int = 250,
    real_fd: float | None = None,
) -> dict[str, float]:
    """What a tokenizer alone costs: ``real_train``'s images encoded and decoded by ``vae`` (``img_to_recon``, images
    in [-1, 1]), scored as samples are (accuracy of their labels, Fréchet distance to ``real_test``, its ratio to the
    real train-vs-test distance: ``real_fd`` where the caller has it), with their PSNR against the originals. A model's
    samples cannot beat this floor."""
    nc = int(real_train[1].max()) + 1
    fd_key = f"FD-{net_name}"
    if real_fd is None:
        real_fd = evaluate(real_train[0], real_test[0], net, None, net_name)[fd_key]
    x_NCHW = torch.from_numpy(real_train[0]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    rec_NCHW = torch.cat(
        [vae.img_to_recon(x_NCHW[i : i + batch_size]).float() for i in range(0, len(x_NCHW), batch_size)]
    )
    r = evaluate(to_uint8_nhwc(rec_NCHW.add(1).div(2)), real_test[0], net, real_train[1], net_name, num_classes=nc)
    return {
        fd_key: r[fd_key],
        "fd_ratio": r[fd_key] / real_fd,
        "class_accuracy": r["class_accuracy"],
        "psnr": psnr(rec_NCHW, x_NCHW),
    }


def choose_defaults(
    settings: Sequence[Mapping[str, Any]], accuracy_target: float
) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The sampling defaults a ``conditional_quality`` sweep recommends: the setting with the lowest Fréchet
    distance among those at ``accuracy_target`` class accuracy or more, else the most accurate one. Returns its
    ``cfg``, ``top_k`` and ``top_p`` (a model folder's ``sampling_defaults``) and its row of the report."""
    accurate = [s for s in settings if s["class_accuracy"] >= accuracy_target]
    best = min(accurate, key=lambda s: s["fd_ratio"]) if accurate else max(settings, key=lambda s: s["class_accuracy"])
    return {"cfg": best["cfg"], "top_k": best["top_k"], "top_p": best["top_p"]}, best
