"""Which pipeline serves which model family: one registration per family, by module path (imported on first use).

The family-agnostic callers (the CLI's dispatch, jobs) ask this registry, never a family's module: which families
exist, a family's pipeline class, and which family an official file or a model folder holds. Adding a family is a
folder per layer (models/, engine/<family>/, pipelines/<family>.py) and a line here; its pipeline class says the
rest (``family``, ``family_title``, ``official_options``, ``claims_file``: 0 not its file, 1 has the names of its
files, 2 has names only its files have).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from nextscale.errors import CheckpointError

# family -> "module:PipelineClass". Files are offered to the families in this order (``family_of_file``).
REGISTRY: dict[str, str] = {
    "var": "nextscale.pipelines.var:VARPipeline",
    "raster": "nextscale.pipelines.raster:LlamaGenPipeline",
    "infinity": "nextscale.pipelines.infinity:InfinityPipeline",
}


def families() -> tuple[str, ...]:
    return tuple(REGISTRY)


def pipeline_class(family: str) -> Any:
    if family not in REGISTRY:
        raise CheckpointError(f"unknown model family {family!r}; known: {', '.join(REGISTRY)}")
    module, _, name = REGISTRY[family].partition(":")
    return getattr(importlib.import_module(module), name)


def family_title(family: str) -> str:
    """How messages name a family: "VAR (next-scale)", "raster (LlamaGen)"."""
    return str(pipeline_class(family).family_title)


def family_of_file(path: str | Path) -> str:
    """The family whose official files ``path`` is one of (its model or its tokenizer), by the tensors it holds.

    A file no family claims is read once more to say why: unreadable files get the loader's own one-line error
    (empty, truncated, a pickle, text), readable ones a list of what is known."""
    # Families share tensor names (word_embed, head, encoder.conv_in, ...): each says how sure it is (2: names only
    # its files have, 1: names it shares). The first certain family wins, without reading the file for the rest;
    # else the first that shares names.
    claims: dict[str, int] = {}
    for family in REGISTRY:
        claims[family] = int(pipeline_class(family).claims_file(path))
        if claims[family] == 2:
            return family
    best = max(claims, key=lambda f: claims[f])
    if claims[best] > 0:
        return best
    from nextscale.models.torch_files import load_torch_file

    obj = load_torch_file(
        Path(path), "save only the weights (a state dict)"
    )  # the reader's own error for a non-checkpoint
    sd = obj if isinstance(obj, dict) else {}
    known = "; ".join(f"{family_title(f)}: {pipeline_class(f).official_files}" for f in REGISTRY)
    sample = ", ".join(list(sd)[:4])
    raise CheckpointError(f"{path}: not an official file of a known model family ({known}); it holds e.g. {sample}")


def family_of_folder(path: str | Path) -> str:
    """The family a native model folder holds: the one whose pipeline class its ``model_index.json`` names."""
    from nextscale.models.native import INDEX, index_class_name

    name = index_class_name(path)
    for family, spec in REGISTRY.items():
        if spec.partition(":")[2] == name:
            return family
    known = ", ".join(sorted(spec.partition(":")[2] for spec in REGISTRY.values()))
    raise CheckpointError(f"{Path(path) / INDEX}: _class_name is {name!r}; a model folder holds one of {known}")
