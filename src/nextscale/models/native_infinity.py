"""Infinity model folders (``"_class_name": "InfinityPipeline"``): ``transformer/`` an ``Infinity`` (its
``InfinityConfig``), ``vae/`` the ``BSQVAE`` bit tokenizer, and the T5 text encoder either stored beside them
(``text_encoder/`` and ``tokenizer/``, as ``transformers`` saves them) or named by a folder or hub id in
``model_index.json`` (``"text_encoder_source"``: ``google/flan-t5-xl`` is 11 GB and usually already in the HF
cache). The shared format: ``models/native.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nextscale.config import _from_dict, _to_dict
from nextscale.errors import CheckpointError, ConfigError
from nextscale.fileio import atomic_folder
from nextscale.models.infinity import Infinity, InfinityConfig
from nextscale.models.infinity_weights import build_bsq_vae, build_infinity, check_infinity_pair
from nextscale.models.native import INDEX, WEIGHTS, read_json, read_weights, write_component, write_index
from nextscale.models.text_encoder import TextEncoder, save_tokenizer
from nextscale.models.tokenizers.bsq import BSQVAE, BSQVAEConfig

PIPELINE = "InfinityPipeline"
TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"
SOURCE_KEY = "text_encoder_source"


def save_infinity_native(
    path: str | Path,
    transformer: Infinity,
    vae: BSQVAE,
    text_encoder: TextEncoder | str,
    extra_index: dict[str, Any] | None = None,
    transformer_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an Infinity model as a native folder at ``path``, atomically. ``text_encoder``: a ``TextEncoder`` to
    store in the folder, or a folder path / hub id to name instead. What may be replaced at ``path``: as for
    ``native_var.save_native``."""
    check_infinity_pair(transformer.cfg, vae.cfg, str(path))
    if isinstance(text_encoder, str) and not text_encoder.strip():
        raise ConfigError("text_encoder must be a TextEncoder or a folder / hub id, got an empty string")

    def fill(tmp: Path) -> None:
        components: dict[str, Any] = {"transformer": ["nextscale", "Infinity"], "vae": ["nextscale", "BSQVAE"]}
        if isinstance(text_encoder, TextEncoder):
            components[TEXT_ENCODER] = ["transformers", type(text_encoder.encoder).__name__]
            name = type(text_encoder.tokenizer).__name__
            # transformers 5's generic fast tokenizer class; 4.x knows it as PreTrainedTokenizerFast (save_tokenizer)
            components[TOKENIZER] = ["transformers", "PreTrainedTokenizerFast" if name == "TokenizersBackend" else name]
        else:
            components[SOURCE_KEY] = str(text_encoder)
        write_index(tmp, PIPELINE, {**components, **(extra_index or {})})
        write_component(tmp, "transformer", transformer, transformer_dtype, _Config(transformer.cfg))
        write_component(tmp, "vae", vae, None, _Config(vae.cfg))
        if isinstance(text_encoder, TextEncoder):
            text_encoder.encoder.save_pretrained(tmp / TEXT_ENCODER, safe_serialization=True)
            save_tokenizer(text_encoder.tokenizer, tmp / TOKENIZER)

    return atomic_folder(Path(path), fill, (INDEX,), overwrite)


def load_infinity_native(path: str | Path) -> tuple[Infinity, BSQVAE, str, dict[str, Any]]:
    """Load an Infinity folder strictly; returns (transformer, vae, where the text encoder is, model_index). The
    text encoder itself is loaded by the caller (``TextEncoder.from_pretrained``), since it may be a hub id."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    index = read_json(folder / INDEX)
    if index.get("_class_name") != PIPELINE:
        raise CheckpointError(f"{folder / INDEX}: _class_name is {index.get('_class_name')!r}, expected {PIPELINE!r}")
    transformer = _load(folder, "transformer", InfinityConfig)
    vae = _load(folder, "vae", BSQVAEConfig)
    assert isinstance(transformer, Infinity) and isinstance(vae, BSQVAE)
    check_infinity_pair(transformer.cfg, vae.cfg, str(folder))
    if TEXT_ENCODER in index:
        source = str(folder / TEXT_ENCODER)
    elif isinstance(index.get(SOURCE_KEY), str) and index[SOURCE_KEY].strip():
        source = index[SOURCE_KEY]
    else:
        raise CheckpointError(
            f"{folder / INDEX}: names no text encoder: a {TEXT_ENCODER!r} component (stored in the folder) or a "
            f"{SOURCE_KEY!r} (a folder or hub id)"
        )
    return transformer, vae, source, index


def save_bsq_tokenizer(path: str | Path, vae: BSQVAE, extra_index: dict[str, Any] | None = None) -> Path:
    """A tokenizer-only folder (``vae/`` component), as ``nextscale train-vae --arch bsq`` writes it."""

    def fill(tmp: Path) -> None:
        write_index(tmp, "BSQVAE", {"vae": ["nextscale", "BSQVAE"], **(extra_index or {})})
        write_component(tmp, "vae", vae, None, _Config(vae.cfg))

    return atomic_folder(Path(path), fill)


def load_bsq_tokenizer(path: str | Path) -> BSQVAE:
    """The bit tokenizer of a tokenizer folder (``train-vae --arch bsq``) or of an Infinity model folder."""
    folder = Path(path)
    if not (folder / "vae" / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a tokenizer or Infinity model folder (no vae/config.json)")
    vae = _load(folder, "vae", BSQVAEConfig)
    assert isinstance(vae, BSQVAE)
    return vae


def text_encoder_parts(folder: Path, source: str) -> tuple[str, str]:
    """Where ``TextEncoder.from_pretrained`` reads the encoder and the tokenizer of a folder whose text encoder is
    ``source``: a stored encoder has its tokenizer in ``tokenizer/``."""
    stored = Path(source) == folder / TEXT_ENCODER
    return source, str(folder / TOKENIZER) if stored else source


def _load(folder: Path, name: str, cfg_cls: type) -> torch.nn.Module:
    cfg_path, w_path = folder / name / "config.json", folder / name / WEIGHTS
    raw = read_json(cfg_path)
    try:
        cfg = _from_dict(cfg_cls, raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    sd, source = read_weights(w_path), str(w_path)
    return build_infinity(cfg, sd, source) if isinstance(cfg, InfinityConfig) else build_bsq_vae(cfg, sd, source)


class _Config:
    """A config dataclass as ``write_component`` stores it (``to_dict``)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self.cfg)
