"""VAR model folders (``"_class_name": "VARPipeline"``): ``transformer/`` a ``VAR`` (its ``VARConfig``, class names
included), ``vae/`` the multi-scale ``VQVAE``, optionally ``refiner/`` (a second, smaller ``VAR`` on the same
tokenizer: collaborative decoding, CoDe); and tokenizer-only folders (``"_class_name": "VQVAE"``), which
``nextscale train-vae`` writes for either family. The shared format: ``models/native.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nextscale.config import VARConfig, VQVAEConfig
from nextscale.errors import CheckpointError, ConfigError
from nextscale.fileio import atomic_folder
from nextscale.models.native import INDEX, WEIGHTS, read_json, read_weights, write_component, write_index
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR
from nextscale.models.weights import build_vae, build_var, check_pair

# "refiner": an optional second, smaller transformer on the same tokenizer (collaborative decoding, CoDe).
_COMPONENTS = {"transformer": (VAR, VARConfig), "vae": (VQVAE, VQVAEConfig), "refiner": (VAR, VARConfig)}


def save_native(
    path: str | Path,
    var: VAR,
    vae: VQVAE,
    extra_index: dict[str, Any] | None = None,
    transformer_dtype: torch.dtype | None = None,
    components: dict[str, VAR] | None = None,
    files: dict[str, str] | None = None,
    overwrite: bool = False,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write ``var`` and ``vae`` as a native model folder at ``path`` (an earlier model folder there is replaced
    atomically; anything else is refused unless ``overwrite``, which moves it aside: ``fileio.atomic_folder``).

    ``transformer_dtype`` stores the transformer's weights in e.g. float16 to halve the folder (they load
    back into whatever dtype the pipeline uses); the VQ-VAE is always stored as it is. ``components`` adds
    further transformers on the same tokenizer (``{"refiner": small_var}``), stored like the transformer.
    ``files``: text files written beside ``model_index.json`` (e.g. the KV-cache calibration). ``class_names``: the
    names to store in the transformer's ``config.json`` (``VARConfig.class_names``), default the transformer's own.
    """
    var_cfg = var.cfg if class_names is None else dataclasses.replace(var.cfg, class_names=tuple(class_names))
    extra = dict(components or {})
    unknown = set(extra) - (set(_COMPONENTS) - {"transformer", "vae"})
    if unknown:
        raise ConfigError(f"unknown model components {sorted(unknown)}; allowed: refiner")

    def fill(tmp: Path) -> None:
        write_index(
            tmp,
            "VARPipeline",
            {
                "transformer": ["nextscale", "VAR"],
                "vae": ["nextscale", "VQVAE"],
                **{k: ["nextscale", "VAR"] for k in extra},
                **(extra_index or {}),
            },
        )
        write_component(tmp, "transformer", var, transformer_dtype, var_cfg)
        write_component(tmp, "vae", vae)
        for name, model in extra.items():
            write_component(tmp, name, model, transformer_dtype)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    return atomic_folder(Path(path), fill, (INDEX,), overwrite)


def save_tokenizer(path: str | Path, vae: VQVAE, extra_index: dict[str, Any] | None = None) -> Path:
    """A tokenizer-only folder (``vae/`` component), as ``nextscale train-vae`` writes it."""

    def fill(tmp: Path) -> None:
        write_index(tmp, "VQVAE", {"vae": ["nextscale", "VQVAE"], **(extra_index or {})})
        write_component(tmp, "vae", vae)

    return atomic_folder(Path(path), fill)


def load_tokenizer(path: str | Path, patch_nums: tuple[int, ...] | None = None) -> VQVAE:
    """The VQ-VAE of a tokenizer folder, of a full model folder, or of an official ``vae_*.pth`` file."""
    p = Path(path)
    if p.is_file():
        from nextscale.models.weights import load_official_vae

        return load_official_vae(p, patch_nums)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such tokenizer folder or file")
    vae = _load_component(p, "vae")
    assert isinstance(vae, VQVAE)
    return vae


def load_component(folder: str | Path, name: str) -> torch.nn.Module:
    """One component (``transformer``, ``vae``, ``refiner``) of a native model folder."""
    return _load_component(Path(folder), name)


def _load_component(folder: Path, name: str) -> torch.nn.Module:
    cls, cfg_cls = _COMPONENTS[name]
    cfg_path, w_path = folder / name / "config.json", folder / name / WEIGHTS
    try:
        cfg = cfg_cls.from_dict(read_json(cfg_path))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    sd = read_weights(w_path)
    return build_var(cfg, sd, str(w_path)) if cls is VAR else build_vae(cfg, sd, str(w_path))


def load_native(path: str | Path) -> tuple[VAR, VQVAE, dict[str, Any]]:
    """Load a native model folder; returns (transformer, vae, model_index)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    index = read_json(folder / INDEX)
    if index.get("_class_name") != "VARPipeline":
        raise CheckpointError(f"{folder / INDEX}: _class_name is {index.get('_class_name')!r}, expected 'VARPipeline'")
    var = _load_component(folder, "transformer")
    vae = _load_component(folder, "vae")
    assert isinstance(var, VAR) and isinstance(vae, VQVAE)
    check_pair(var.cfg, vae.cfg, str(folder))
    return var, vae, index
