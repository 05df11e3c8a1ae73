"""Score a sample set against reference images in a feature network's space.

Reports the Fréchet distance (named after the network: "FD-<net>"; it is FID only with the Inception
network), improved precision/recall (k-NN manifolds), an Inception-style score from the network's class
probabilities and, when the samples carry class labels and the network is a classifier of the same classes,
the class accuracy of class-conditional samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nextscale.errors import InvalidInputError
from nextscale.eval.metrics import (
    FeatureNet,
    class_accuracy,
    feature_stats,
    frechet_distance,
    inception_score,
    load_npz_samples,
    precision_recall,
)


def load_image_set(
    spec: str | Path, image_size: int | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NHWC images (and labels when known) from an ``.npz`` sample file, a PNG folder, or a built-in
    dataset split written ``fashion-mnist:test`` / ``mnist5k:test``."""
    text = str(spec)
    if ":" in text and not Path(text).exists():
        from nextscale.data import load_dataset

        name, split = text.split(":", 1)
        ds = load_dataset(name, split, image_size or 32)
        imgs = ds.images[:limit].permute(0, 2, 3, 1).contiguous().numpy()  # type: ignore[union-attr]
        return imgs, ds.labels[:limit].numpy()  # type: ignore[union-attr]
    path = Path(text)
    if path.suffix == ".npz":
        images = load_npz_samples(path)
        with np.load(path) as z:
            labels = z["arr_1"] if "arr_1" in z.files else None
        return images[:limit], None if labels is None else labels[:limit]
    if path.is_dir():
        from PIL import Image

        files = sorted(path.glob("*.png"))[:limit]
        if not files:
            raise InvalidInputError(f"{path}: no .png files")
        arrs = [np.asarray(Image.open(f)) for f in files]
        return np.stack([a if a.ndim == 3 else a[..., None] for a in arrs]), None
    raise InvalidInputError(
        f"{spec}: expected a .npz file, a folder of PNGs, or dataset:split (e.g. fashion-mnist:test)"
    )


def load_feature_net(spec: str | Path) -> tuple[str, FeatureNet]:
    """``classifier:FOLDER`` (a project classifier), ``inception:FILE`` (the FID Inception-v3 weights) or a
    classifier folder. Returns (short name for reports, network)."""
    text = str(spec)
    kind, sep, path = text.partition(":")
    if not sep or kind not in ("classifier", "inception"):
        kind, path = "classifier", text
    if kind == "inception":
        from nextscale.eval.inception import InceptionFeatures

        return "Inception", InceptionFeatures.from_file(path)
    from nextscale.eval.classifier import load_classifier

    return f"classifier({Path(path).name})", load_classifier(path)


@torch.inference_mode()
def evaluate(
    samples: np.ndarray,
    reference: np.ndarray,
    net: FeatureNet,
    sample_labels: np.ndarray | None = None,
    net_name: str = "net",
    k: int = 3,
    num_classes: int | None = None,
) -> dict[str, Any]:
    if len(samples) < 2 or len(reference) < 2:
        raise InvalidInputError(f"need at least 2 samples and 2 reference images, got {len(samples)}, {len(reference)}")
    fs, ls = _features_and_logits(net, samples)
    fr, _ = _features_and_logits(net, reference)
    mu_s, sig_s = feature_stats(fs)
    mu_r, sig_r = feature_stats(fr)
    prec, rec = precision_recall(fr, fs, k=k)
    is_mean, is_std = inception_score(ls.softmax(-1), splits=min(10, max(1, len(samples) // 100)))
    out: dict[str, Any] = {
        "samples": len(samples),
        "reference": len(reference),
        "features": net_name,
        f"FD-{net_name}": frechet_distance(mu_s, sig_s, mu_r, sig_r),
        "precision": prec,
        "recall": rec,
        "IS": is_mean,
        "IS_std": is_std,
    }
    if sample_labels is not None and num_classes is not None and ls.shape[-1] == num_classes:
        acc, per_class = class_accuracy(ls.argmax(-1), torch.as_tensor(sample_labels), num_classes)
        out["class_accuracy"], out["per_class_accuracy"] = acc, per_class
    return out


def _features_and_logits(net: FeatureNet, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    both = getattr(net, "features_and_logits", None)
    if both is not None:
        return both(images)
    return net.features(images), net.logits(images)
