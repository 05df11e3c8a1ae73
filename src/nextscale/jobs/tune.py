"""``tune-accel``: measure acceleration settings on the user's own model and keep the fastest that meet a budget.

Every candidate combination samples the same images (same labels and seeds) as exact. Fidelity is class accuracy
with the model's classifier when it has one (a ``classifier/`` folder, or ``"classifier": "<bundled model>"`` in
``model_index.json``), else PSNR of the images against exact's. Speed is the FLOP model's ratio to exact (the work
each plan removes; deterministic, where wall time on a shared machine is not; ``bench_accel.py`` shows how the two
compare). ``balanced`` becomes the fastest candidate within the budget, ``fast`` the fastest within the looser one
(exact where none is); both are written into ``model_index.json`` (``accel_presets``), where presets and the server's
quality levels pick them up.

For raster models the counterpart is a speculative-decoding sweep (``speculative_sweep``): exact and each candidate
spec with the same seeds, forward passes per image against class accuracy and Fréchet distance; the candidate with
the fewest passes within an accuracy margin of exact becomes the model's ``fast`` preset (``fastest_speculative``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nextscale.eval.classifier import SmallClassifier, load_classifier
from nextscale.eval.evaluate import evaluate
from nextscale.eval.metrics import FeatureNet
from nextscale.fileio import atomic_file
from nextscale.images import to_uint8_nhwc
from nextscale.models.native import bundled_model_dir
from nextscale.pipelines.raster import LlamaGenPipeline
from nextscale.pipelines.var import VARPipeline

log = logging.getLogger(__name__)

CANDIDATES: list[list[str]] = [
    ["cfg-cutoff:last=1"],
    ["cfg-cutoff"],
    ["fastvar:keep=0.6"],
    ["fastvar"],
    ["fastvar:keep=0.25"],
    ["skip-scales"],
    ["cfg-cutoff:last=1", "fastvar"],
    ["cfg-cutoff", "fastvar"],
    ["cfg-cutoff", "fastvar:keep=0.25"],
    ["cfg-cutoff", "fastvar:keep=0.25", "skip-scales"],
    ["cfg-cutoff:last=3", "scalekv"],  # KV compression: also less memory (more requests per engine pool)
    ["cfg-cutoff", "fastvar", "scalekv"],
    # Milder ones for models with few scales, where each late scale is a large share of the tokens (the demo's last
    # of 6 scales holds 64 of 130): there pruning and dropping guidance cost more accuracy than on VAR's 10 scales.
    ["scalekv"],
    ["cfg-cutoff:last=1", "scalekv"],
    ["cfg-cutoff", "scalekv"],
]
REFINER_CANDIDATES: list[list[str]] = [
    ["code"],
    ["cfg-cutoff", "code"],
    ["cfg-cutoff", "fastvar:keep=0.25", "code"],
    ["cfg-cutoff", "fastvar:keep=0.25", "code:draft=-3"],
]


@dataclass(frozen=True)
class Budget:
    """Allowed fidelity loss: class-accuracy points (with a classifier), else a PSNR floor in dB."""

    max_accuracy_drop: float = 1.0
    min_psnr: float = 30.0
    fast_max_accuracy_drop: float = 5.0
    fast_min_psnr: float = 25.0


def model_classifier(folder: Path) -> SmallClassifier | None:
    index = json.loads((folder / "model_index.json").read_text())
    if (folder / "classifier").is_dir():
        return load_classifier(folder / "classifier")
    if isinstance(index.get("classifier"), str) and (bundled_model_dir(index["classifier"]) / "classifier").is_dir():
        return load_classifier(bundled_model_dir(index["classifier"]) / "classifier")
    return None


@torch.inference_mode()
def tune(
    folder: str | Path,
    budget: Budget,
    per_class: int = 20,
    seed: int = 0,
    candidates: Sequence[Sequence[str]] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    folder = Path(folder)
    pipe = VARPipeline.from_pretrained(folder)
    clf = model_classifier(folder)
    labels = np.repeat(np.arange(pipe.num_classes), per_class).tolist()
    exact = pipe(labels, seed=seed, output_type="pt")
    base = _score(exact.images, exact.images, labels, clf)
    cands = [list(c) for c in (candidates or CANDIDATES + (REFINER_CANDIDATES if pipe.refiner is not None else []))]
    rows = []
    for specs in cands:
        pipe.plan(specs)  # a candidate the model cannot run fails here, in one line
        out = pipe(labels, seed=seed, output_type="pt", accel=specs)
        row = {"accel": specs, "flop_ratio": exact.stats["flops"] / out.stats["flops"]}
        row.update(_score(out.images, exact.images, labels, clf))
        rows.append(row)
        log.info("%s: %.2fx (FLOP model), %s", ",".join(specs), row["flop_ratio"], _fmt(row))
    presets = {
        "balanced": _fastest(rows, base, budget.max_accuracy_drop, budget.min_psnr, clf is not None),
        "fast": _fastest(rows, base, budget.fast_max_accuracy_drop, budget.fast_min_psnr, clf is not None),
    }
    report = {
        "metric": "class_accuracy" if clf is not None else "psnr",
        "per_class": per_class,
        "exact": base,
        "budget": budget.__dict__,
        "candidates": rows,
        "presets": presets,
    }
    if write:
        write_presets(folder, presets, report)
    return report


def _score(images: torch.Tensor, exact: torch.Tensor, labels: list[int], clf: SmallClassifier | None) -> dict:
    mse = (images.float() - exact.float()).square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
    out = {"psnr": float((10 * torch.log10(1 / mse)).clamp_max(99.0).mean())}
    if clf is not None:
        pred = clf.logits(to_uint8_nhwc(images)).argmax(-1).numpy()
        out["class_accuracy"] = float((pred == np.asarray(labels)).mean())
    return out


def _fastest(rows: list[dict], base: dict, max_drop: float, min_psnr: float, by_accuracy: bool) -> list[str] | None:
    if by_accuracy:
        ok = [r for r in rows if 100 * (base["class_accuracy"] - r["class_accuracy"]) <= max_drop]
    else:
        ok = [r for r in rows if r["psnr"] >= min_psnr]
    return max(ok, key=lambda r: r["flop_ratio"])["accel"] if ok else None


def _fmt(row: dict) -> str:
    acc = f", accuracy {row['class_accuracy']:.3f}" if "class_accuracy" in row else ""
    return f"PSNR {row['psnr']:.1f} dB{acc}"


def write_presets(folder: Path, presets: dict[str, list[str] | None], report: dict) -> None:
    """A preset that no candidate runs within its budget is stored as exact (``[]``): the built-in combinations are
    among the candidates, so falling back to them would run a setting measured outside the budget on this model."""
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index["accel_presets"] = {k: v or [] for k, v in presets.items()}
    index["accel_tuning"] = {k: report[k] for k in ("metric", "per_class", "exact", "budget")}
    atomic_file(path, lambda f: f.write((json.dumps(index, indent=2) + "\n").encode()))


# ---- raster models: speculative presets ------------------------------------------------------------------------------
@torch.inference_mode()
def speculative_sweep(
    pipe: LlamaGenPipeline,
    net: FeatureNet,
    defaults: Mapping[str, Any],
    real: tuple[np.ndarray, np.ndarray],
    per_class: int,
    specs: Sequence[str],
    seed: int = 0,
    batch_size: int = 100,
) -> list[dict[str, Any]]:
    """Exact, then each speculative spec, with the same seeds and the sampling ``defaults`` (``cfg``, ``top_k``,
    ``top_p``): forward passes per image, class accuracy and Fréchet distance to ``real`` in ``net``'s space."""
    nc = pipe.num_classes
    labels = np.repeat(np.arange(nc), per_class)
    rows = []
    for spec in ("exact", *specs):
        images, passes = [], 0.0
        for i in range(0, len(labels), batch_size):
            chunk = labels[i : i + batch_size].tolist()
            out = pipe(
                chunk,
                cfg=defaults["cfg"],
                top_k=defaults["top_k"],
                top_p=defaults["top_p"],
                seed=seed,
                output_type="pt",
                image_indices=range(i, i + len(chunk)),
                speculative=None if spec == "exact" else spec,
            )
            images.append(out.images)
            passes += float(out.stats["forward_passes"]) * len(chunk)
        r = evaluate(to_uint8_nhwc(torch.cat(images)), real[0], net, labels, "classifier", num_classes=nc)
        row = {
            "spec": spec,
            "forward_passes": passes / len(labels),
            "class_accuracy": r["class_accuracy"],
            "FD-classifier": r["FD-classifier"],
        }
        rows.append(row)
        log.info("speculative %s: %.1f passes, accuracy %.3f", spec, row["forward_passes"], row["class_accuracy"])
    return rows


def fastest_speculative(rows: Sequence[Mapping[str, Any]], margin: float) -> str | None:
    """The spec with the fewest passes among those within ``margin`` class accuracy of exact (``rows[0]``, as
    ``speculative_sweep`` orders them); None when none is."""
    floor = rows[0]["class_accuracy"] - margin
    ok = [r for r in rows[1:] if r["class_accuracy"] >= floor]
    return min(ok, key=lambda r: r["forward_passes"])["spec"] if ok else None
