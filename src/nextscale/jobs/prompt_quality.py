"""Prompt following of a text-to-image model on the Fashion-MNIST pairs (``data.captions``): does the image hold
the two items the prompt asks for, each on its side?

Each image is cut into its left and right halves and a Fashion-MNIST classifier (the bundled demo's) reads each
half: an image *follows* its prompt when both halves are the asked classes. ``pair_accuracy`` is that share, per
prompt kind: "seen" (pairs and phrasings of training), "held-out-pairs" (ordered pairs never in training) and
"held-out-phrasings" (templates never in training). The halves' Fréchet distance to real test items in the
classifier's features says how good the items look, with the real train-vs-test distance as its scale.
Image i of a kind is seeded by (seed, i): the same images for every setting and method compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nextscale.data.captions import prompts
from nextscale.eval.evaluate import evaluate
from nextscale.eval.metrics import FeatureNet
from nextscale.images import to_uint8_nhwc

KINDS = ("seen", "held-out-pairs", "held-out-phrasings")


def prompt_set(kind: str, count: int) -> list[tuple[str, int, int]]:
    """``count`` (prompt, left class, right class) of ``kind``: its prompts in order, cycled (every prompt once
    before any twice; a fixed, spread subset when ``count`` is smaller)."""
    every = prompts(kind)
    if count <= len(every):
        pick = np.linspace(0, len(every) - 1, count).round().astype(int)
        return [every[i] for i in pick]
    return [every[i % len(every)] for i in range(count)]


def halves(images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves of uint8 NHWC images."""
    w = images_NHWC.shape[2] // 2
    return images_NHWC[:, :, :w], images_NHWC[:, :, w:]


@torch.inference_mode()
def sample_prompts(
    pipe: Any, asked: Sequence[tuple[str, int, int]], settings: dict[str, Any], batch_size: int = 100
) -> np.ndarray:
    """uint8 NHWC images of the prompts ``asked`` (image i seeded by (seed, i))."""
    out = []
    for i in range(0, len(asked), batch_size):
        chunk = [p for p, _, _ in asked[i : i + batch_size]]
        res = pipe(chunk, **settings, output_type="pt", image_indices=range(i, i + len(chunk)))
        out.append(to_uint8_nhwc(res.images))
    return np.concatenate(out)


def read_pairs(net: FeatureNet, images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes the classifier reads in the left and right halves."""
    left, right = halves(images_NHWC)
    return (net.logits(left).argmax(-1).numpy(), net.logits(right).argmax(-1).numpy())


def pair_scores(net: FeatureNet, images_NHWC: np.ndarray, asked: Sequence[tuple[str, int, int]]) -> dict[str, float]:
    left, right = read_pairs(net, images_NHWC)
    want_l = np.array([a for _, a, _ in asked])
    want_r = np.array([b for _, _, b in asked])
    return {
        "pair_accuracy": float(((left == want_l) & (right == want_r)).mean()),
        "left_accuracy": float((left == want_l).mean()),
        "right_accuracy": float((right == want_r).mean()),
    }


def prompt_quality(
    pipe: Any,
    net: FeatureNet,
    real_items: tuple[np.ndarray, np.ndarray],
    counts: dict[str, int],
    settings: dict[str, Any],
    net_name: str = "classifier",
    batch_size: int = 100,
) -> dict[str, Any]:
    """Pair accuracy per prompt kind (``counts[kind]`` images each) and the Fréchet distance of all the images'
    halves to ``real_items`` (uint8 NHWC test items, labels) in ``net``'s features, for one sampling setting."""
    report: dict[str, Any] = {"settings": dict(settings)}
    all_halves = []
    for kind, count in counts.items():
        asked = prompt_set(kind, count)
        images = sample_prompts(pipe, asked, settings, batch_size)
        report[kind] = {"images": len(images), **pair_scores(net, images, asked)}
        all_halves += list(halves(images))
    fd_key = f"FD-{net_name}"
    r = evaluate(np.concatenate(all_halves), real_items[0], net, None, net_name)
    report[fd_key] = r[fd_key]
    return report


def guidance_sweep(
    pipe: Any,
    net: FeatureNet,
    real_items: tuple[np.ndarray, np.ndarray],
    scale: Mapping[str, float],
    counts: dict[str, int],
    grid: Sequence[tuple[float, float]],
    seed: int = 0,
    net_name: str = "classifier",
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``prompt_quality`` at each (cfg, tau) of ``grid`` with the same seed, each row with ``fd_ratio``: its FD over
    ``scale`` (``real_item_scale``). ``on_row(row)`` runs after each setting (progress, logs)."""
    rows = []
    for cfg, tau in grid:
        row = prompt_quality(pipe, net, real_items, counts, {"cfg": cfg, "tau": tau, "seed": seed}, net_name)
        row["fd_ratio"] = row[f"FD-{net_name}"] / scale[f"FD-{net_name}"]
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def choose_setting(rows: Sequence[Mapping[str, Any]], kind: str = "seen") -> Mapping[str, Any]:
    """The row of a ``guidance_sweep`` to make a model's default: of the settings whose ``kind`` pair accuracy is
    within one standard error (binomial, at the best row's share and image count) of the best, the one with the
    lowest ``fd_ratio``. Why not the best share alone: at 300 images a point is three images, so the top share is
    often noise while the FD difference between guidance settings is not. Only ``kind`` (seen prompts by default)
    picks, so the held-out prompts stay a test."""
    if not rows:
        raise ValueError("choose_setting: no rows (the sweep's grid was empty)")
    best = max(rows, key=lambda r: r[kind]["pair_accuracy"])
    p, n = best[kind]["pair_accuracy"], best[kind]["images"]
    floor = p - math.sqrt(p * (1.0 - p) / n)
    return min((r for r in rows if r[kind]["pair_accuracy"] >= floor), key=lambda r: r["fd_ratio"])


def real_item_scale(
    net: FeatureNet, real_train: np.ndarray, real_test: np.ndarray, net_name: str = "classifier"
) -> dict[str, float]:
    """The real train-vs-test Fréchet distance of items in ``net``'s features: the scale of the halves' FD."""
    r = evaluate(real_train, real_test, net, None, net_name)
    return {f"FD-{net_name}": r[f"FD-{net_name}"]}
