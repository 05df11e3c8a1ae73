"""Class-balanced sample sets for FID-style evaluation (the VAR protocol: N images per class, one seed each).

Image ``g`` (global index = class position * per_class + j) is generated with a generator seeded from
``(seed, g)``, so a set does not depend on batch size, on the number of ranks, or on being resumed: existing
``{g:06d}.png`` files are skipped, and under torchrun rank r makes the images with ``g % world == r``. The
folder is then packed into an ADM-compatible ``.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) and the
protocol is recorded next to it in ``protocol.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nextscale import __version__
from nextscale.engine.params import SeededParams
from nextscale.eval.metrics import save_npz_samples
from nextscale.jobs import SamplingPipeline


@dataclass(frozen=True)
class SampleSetSpec:
    classes: tuple[int, ...]
    per_class: int
    params: SeededParams  # the pipeline's own params object (``pipe.sampling_params(...)``)
    batch_size: int = 16

    def labels(self) -> list[int]:
        return [c for c in self.classes for _ in range(self.per_class)]


def image_path(folder: Path, g: int) -> Path:
    return folder / f"{g:06d}.png"


def generate_set(
    pipe: SamplingPipeline,
    folder: str | Path,
    spec: SampleSetSpec,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> int:
    """Write this rank's missing images of the set into ``folder``; returns how many were generated."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = spec.labels()
    todo = [g for g in range(rank, len(labels), world_size) if not image_path(folder, g).exists()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"samples (rank {rank})", unit="img")
    settings = pipe.call_kwargs(spec.params)
    for i in range(0, len(todo), spec.batch_size):
        chunk = todo[i : i + spec.batch_size]
        out = pipe([labels[g] for g in chunk], **settings, image_indices=chunk)
        for g, img in zip(chunk, out.images):
            _save_png(img, image_path(folder, g))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return len(todo)


def _save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_suffix(".png.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)  # a killed job never leaves a half-written PNG that would be skipped on resume


def pack(
    folder: str | Path, spec: SampleSetSpec, out_npz: str | Path | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Read ``{g:06d}.png`` in index order into ``<folder>.npz`` and write ``protocol.json``."""
    folder = Path(folder)
    labels = spec.labels()
    missing = [g for g in range(len(labels)) if not image_path(folder, g).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: {len(missing)} of {len(labels)} images missing (e.g. "
            f"{image_path(folder, missing[0]).name}); run sample-fid again to finish"
        )
    arrs = [np.asarray(Image.open(image_path(folder, g))) for g in range(len(labels))]
    images = np.stack([a if a.ndim == 3 else a[..., None] for a in arrs])
    out = Path(out_npz) if out_npz else folder.with_suffix(".npz")
    save_npz_samples(out, images, np.asarray(labels, dtype=np.int64))
    protocol = {
        "nextscale": __version__,
        "images": len(labels),
        "per_class": spec.per_class,
        "classes": list(spec.classes),
        "sampling": asdict(spec.params),
        "npz": str(out.name),
        **(extra or {}),
    }
    (folder / "protocol.json").write_text(json.dumps(protocol, indent=2) + "\n")
    return out
