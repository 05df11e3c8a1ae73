"""Raster model folders (``"_class_name": "LlamaGenPipeline"``): ``transformer/`` holds the ``LlamaGen`` GPT (its
``LlamaGenConfig``, n_head and image_size included, so nothing is inferred on load) and ``vae/`` its tokenizer, whose
kind is the ``_class_name`` of ``vae/config.json``: ``VQModel`` (the official LlamaGen VQ, ``VQConfig``) or ``VQVAE``
(nextscale's own VQ-VAE with a single scale, ``VQVAEConfig``). The shared format: ``models/native.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nextscale.config import VQVAEConfig, _from_dict
from nextscale.errors import CheckpointError, ConfigError
from nextscale.fileio import atomic_folder
from nextscale.models.llamagen import LlamaGen, LlamaGenConfig
from nextscale.models.llamagen_weights import build_llamagen_gpt, build_llamagen_vq, check_llamagen_pair
from nextscale.models.native import INDEX, WEIGHTS, read_json, read_weights, write_component, write_index
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.tokenizers.vq import VQConfig, VQModel
from nextscale.models.weights import build_vae

RASTER_PIPELINE = "LlamaGenPipeline"
# What a raster folder's components may be, by the _class_name of their config.json.
RASTER_TRANSFORMERS: dict[str, tuple[type[torch.nn.Module], type]] = {"LlamaGen": (LlamaGen, LlamaGenConfig)}
RASTER_TOKENIZERS: dict[str, tuple[type[torch.nn.Module], type]] = {
    "VQModel": (VQModel, VQConfig),  # the official LlamaGen VQ tokenizer
    "VQVAE": (VQVAE, VQVAEConfig),  # nextscale's VQ-VAE with a single scale
}
RasterTokenizerModule = VQModel | VQVAE


def check_raster_pair(gpt_cfg: LlamaGenConfig, tokenizer: torch.nn.Module, source: str = "") -> None:
    """A raster GPT works only with a tokenizer of its codebook size, token grid and downsampling."""
    where = f"{source}: " if source else ""
    if isinstance(tokenizer, VQModel):
        check_llamagen_pair(gpt_cfg, tokenizer.cfg, source)
        return
    if not isinstance(tokenizer, VQVAE):
        raise CheckpointError(
            f"{where}a {type(tokenizer).__name__} cannot tokenize for a raster model; allowed: "
            f"{', '.join(RASTER_TOKENIZERS)}"
        )
    c = tokenizer.cfg
    if len(c.patch_nums) != 1:
        raise CheckpointError(
            f"{where}a multi-scale VQ-VAE (patch_nums {c.patch_nums}) cannot tokenize for a raster model; it needs "
            f"a single scale, patch_nums=({gpt_cfg.grid_size},)"
        )
    if c.vocab_size != gpt_cfg.vocab_size:
        raise CheckpointError(f"{where}the GPT predicts {gpt_cfg.vocab_size} codes, the VQ-VAE has {c.vocab_size}")
    if (c.latent_size, c.downsample) != (gpt_cfg.grid_size, gpt_cfg.downsample):
        raise CheckpointError(
            f"{where}the GPT samples a {gpt_cfg.grid_size}x{gpt_cfg.grid_size} token grid at downsample "
            f"{gpt_cfg.downsample} ({gpt_cfg.image_size} px); the VQ-VAE has a {c.latent_size}x{c.latent_size} "
            f"latent at downsample {c.downsample} ({c.image_size} px)"
        )


def save_raster_native(
    path: str | Path,
    gpt: LlamaGen,
    tokenizer: RasterTokenizerModule,
    extra_index: dict[str, Any] | None = None,
    transformer_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a raster model (the GPT and its tokenizer, either kind) as a native folder at ``path``, atomically.

    ``transformer_dtype`` stores the GPT's weights in e.g. bfloat16; the tokenizer is stored as it is. What may be
    replaced at ``path``: as for ``save_native``."""
    kind = type(tokenizer).__name__
    if kind not in RASTER_TOKENIZERS:
        raise ConfigError(f"cannot save a {kind} as a raster tokenizer; allowed: {', '.join(RASTER_TOKENIZERS)}")
    check_raster_pair(gpt.cfg, tokenizer, str(path))

    def fill(tmp: Path) -> None:
        components = {"transformer": ["nextscale", "LlamaGen"], "vae": ["nextscale", kind]}
        write_index(tmp, RASTER_PIPELINE, {**components, **(extra_index or {})})
        write_component(tmp, "transformer", gpt, transformer_dtype)
        write_component(tmp, "vae", tokenizer)

    return atomic_folder(Path(path), fill, (INDEX,), overwrite)


def load_raster_native(path: str | Path) -> tuple[LlamaGen, RasterTokenizerModule, dict[str, Any]]:
    """Load a raster (``LlamaGenPipeline``) model folder strictly; returns (gpt, tokenizer, model_index)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    index = read_json(folder / INDEX)
    if index.get("_class_name") != RASTER_PIPELINE:
        raise CheckpointError(
            f"{folder / INDEX}: _class_name is {index.get('_class_name')!r}, expected {RASTER_PIPELINE!r}"
        )
    gpt = _load_raster_component(folder, index, "transformer", RASTER_TRANSFORMERS)
    tokenizer = _load_raster_component(folder, index, "vae", RASTER_TOKENIZERS)
    assert isinstance(gpt, LlamaGen) and isinstance(tokenizer, (VQModel, VQVAE))
    check_raster_pair(gpt.cfg, tokenizer, str(folder))
    return gpt, tokenizer, index


def _load_raster_component(
    folder: Path, index: dict[str, Any], name: str, kinds: dict[str, tuple[type[torch.nn.Module], type]]
) -> torch.nn.Module:
    cfg_path, w_path = folder / name / "config.json", folder / name / WEIGHTS
    declared = index.get(name)
    if not (isinstance(declared, list) and len(declared) == 2 and declared[1] in kinds):
        raise CheckpointError(
            f"{folder / INDEX}: component {name!r} is {declared!r}; a {RASTER_PIPELINE} {name} is one of "
            + ", ".join(f'["nextscale", "{k}"]' for k in kinds)
        )
    raw = read_json(cfg_path)
    kind = raw.get("_class_name")
    if kind != declared[1]:
        raise CheckpointError(f"{cfg_path}: _class_name is {kind!r}, but {INDEX} declares {declared[1]!r}")
    cfg_cls = kinds[kind][1]
    try:
        cfg = _from_dict(cfg_cls, raw)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    sd, source = read_weights(w_path), str(w_path)
    if isinstance(cfg, LlamaGenConfig):
        return build_llamagen_gpt(cfg, sd, source)
    if isinstance(cfg, VQConfig):
        return build_llamagen_vq(cfg, sd, source)
    return build_vae(cfg, sd, source)
