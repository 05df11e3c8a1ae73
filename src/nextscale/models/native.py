"""The native model format: a folder, diffusers-style, loadable locally or from the Hugging Face hub.

```
model_index.json            {"_class_name": "VARPipeline", "transformer": ..., "vae": ...}
transformer/config.json     VARConfig (incl. class_names)
transformer/model.safetensors
vae/config.json             VQVAEConfig
vae/model.safetensors
```
Weights are safetensors (no pickle). Buffers derivable from the config are not stored. Folders are written
to a temporary sibling and renamed into place, so an interrupted save never leaves a half-written model.

The raster family (LlamaGen) uses the same layout with ``"_class_name": "LlamaGenPipeline"``: ``transformer/``
holds the ``LlamaGen`` GPT (its ``LlamaGenConfig``, n_head and image_size included, so nothing is inferred on
load) and ``vae/`` its tokenizer, whose kind is the ``_class_name`` of ``vae/config.json``: ``VQModel`` (the
official LlamaGen VQ, ``VQConfig``) or ``VQVAE`` (nextscale's own VQ-VAE with a single scale, ``VQVAEConfig``).
``model_index.json`` names the family (``model_family``), so a loader picks the right pipeline from the folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nextscale import __version__
from nextscale.config import VARConfig, VQVAEConfig, _from_dict
from nextscale.errors import CheckpointError, ConfigError
from nextscale.fileio import atomic_folder
from nextscale.models.llamagen import LlamaGen, LlamaGenConfig
from nextscale.models.llamagen_weights import build_llamagen_gpt, build_llamagen_vq, check_llamagen_pair
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.tokenizers.vq import VQConfig, VQModel
from nextscale.models.torch_files import error_detail
from nextscale.models.var import VAR
from nextscale.models.weights import build_vae, build_var, check_pair

INDEX = "model_index.json"
WEIGHTS = "model.safetensors"
# "refiner": an optional second, smaller transformer on the same tokenizer (collaborative decoding, CoDe).
_COMPONENTS = {"transformer": (VAR, VARConfig), "vae": (VQVAE, VQVAEConfig), "refiner": (VAR, VARConfig)}
# The pipeline class a folder's model_index.json names -> the model family it holds.
FAMILIES = {"VARPipeline": "var", "LlamaGenPipeline": "raster"}
RASTER_PIPELINE = "LlamaGenPipeline"
# What a raster folder's components may be, by the _class_name of their config.json.
RASTER_TRANSFORMERS: dict[str, tuple[type[torch.nn.Module], type]] = {"LlamaGen": (LlamaGen, LlamaGenConfig)}
RASTER_TOKENIZERS: dict[str, tuple[type[torch.nn.Module], type]] = {
    "VQModel": (VQModel, VQConfig),  # the official LlamaGen VQ tokenizer
    "VQVAE": (VQVAE, VQVAEConfig),  # nextscale's VQ-VAE with a single scale
}
RasterTokenizerModule = VQModel | VQVAE


def _state_for_saving(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    skip = set(model.derived_buffer_names()) if isinstance(model, VAR) else set()
    out = {}
    for k, v in model.state_dict().items():
        if k not in skip:
            v = v.detach().to("cpu")
            out[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    return out


def _write_component(
    folder: Path, name: str, model: torch.nn.Module, dtype: torch.dtype | None = None, config: Any = None
) -> None:
    """``model`` as ``folder/name/``: its config (``config``: another one to write, e.g. with class names) and its
    weights (floating-point ones in ``dtype`` when given)."""
    (folder / name).mkdir()
    cfg = {"_class_name": type(model).__name__, **(config or model.cfg).to_dict()}  # type: ignore[union-attr]
    (folder / name / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(_state_for_saving(model, dtype), str(folder / name / WEIGHTS), metadata={"format": "pt"})


def _write_index(folder: Path, class_name: str, extra: dict[str, Any] | None = None) -> None:
    index = {"_class_name": class_name, "_nextscale_version": __version__, **(extra or {})}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


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
        _write_index(
            tmp,
            "VARPipeline",
            {
                "transformer": ["nextscale", "VAR"],
                "vae": ["nextscale", "VQVAE"],
                **{k: ["nextscale", "VAR"] for k in extra},
                **(extra_index or {}),
            },
        )
        _write_component(tmp, "transformer", var, transformer_dtype, var_cfg)
        _write_component(tmp, "vae", vae)
        for name, model in extra.items():
            _write_component(tmp, name, model, transformer_dtype)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    return atomic_folder(Path(path), fill, (INDEX,), overwrite)


def save_tokenizer(path: str | Path, vae: VQVAE, extra_index: dict[str, Any] | None = None) -> Path:
    """A tokenizer-only folder (``vae/`` component), as ``nextscale train-vae`` writes it."""

    def fill(tmp: Path) -> None:
        _write_index(tmp, "VQVAE", {"vae": ["nextscale", "VQVAE"], **(extra_index or {})})
        _write_component(tmp, "vae", vae)

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing (not a nextscale model folder?)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_component(folder: str | Path, name: str) -> torch.nn.Module:
    """One component (``transformer``, ``vae``, ``refiner``) of a native model folder."""
    return _load_component(Path(folder), name)


def _load_component(folder: Path, name: str) -> torch.nn.Module:
    cls, cfg_cls = _COMPONENTS[name]
    cfg_path, w_path = folder / name / "config.json", folder / name / WEIGHTS
    try:
        cfg = cfg_cls.from_dict(_read_json(cfg_path))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    sd = _read_weights(w_path)
    return build_var(cfg, sd, str(w_path)) if cls is VAR else build_vae(cfg, sd, str(w_path))


def _read_weights(w_path: Path) -> dict[str, torch.Tensor]:
    if not w_path.is_file():
        raise CheckpointError(f"{w_path}: missing")
    try:
        return load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def load_native(path: str | Path) -> tuple[VAR, VQVAE, dict[str, Any]]:
    """Load a native model folder; returns (transformer, vae, model_index)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    index = _read_json(folder / INDEX)
    if index.get("_class_name") != "VARPipeline":
        raise CheckpointError(f"{folder / INDEX}: _class_name is {index.get('_class_name')!r}, expected 'VARPipeline'")
    var = _load_component(folder, "transformer")
    vae = _load_component(folder, "vae")
    assert isinstance(var, VAR) and isinstance(vae, VQVAE)
    check_pair(var.cfg, vae.cfg, str(folder))
    return var, vae, index


def model_family(path: str | Path) -> str:
    """``"var"`` or ``"raster"``: the family a native model folder holds, from its ``model_index.json`` alone."""
    index_path = Path(path) / INDEX
    name = _read_json(index_path).get("_class_name")
    if name not in FAMILIES:
        raise CheckpointError(
            f"{index_path}: _class_name is {name!r}; a model folder holds one of {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


# ---- the raster family (LlamaGen) ------------------------------------------------------------------------------
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
        _write_index(tmp, RASTER_PIPELINE, {**components, **(extra_index or {})})
        _write_component(tmp, "transformer", gpt, transformer_dtype)
        _write_component(tmp, "vae", tokenizer)

    return atomic_folder(Path(path), fill, (INDEX,), overwrite)


def load_raster_native(path: str | Path) -> tuple[LlamaGen, RasterTokenizerModule, dict[str, Any]]:
    """Load a raster (``LlamaGenPipeline``) model folder strictly; returns (gpt, tokenizer, model_index)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    index = _read_json(folder / INDEX)
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
    raw = _read_json(cfg_path)
    kind = raw.get("_class_name")
    if kind != declared[1]:
        raise CheckpointError(f"{cfg_path}: _class_name is {kind!r}, but {INDEX} declares {declared[1]!r}")
    cfg_cls = kinds[kind][1]
    try:
        cfg = _from_dict(cfg_cls, raw)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    sd, source = _read_weights(w_path), str(w_path)
    if isinstance(cfg, LlamaGenConfig):
        return build_llamagen_gpt(cfg, sd, source)
    if isinstance(cfg, VQConfig):
        return build_llamagen_vq(cfg, sd, source)
    return build_vae(cfg, sd, source)


def bundled_model_dir(name: str = "demo-fmnist") -> Path:
    """A model shipped inside the package (``src/nextscale/assets/NAME``): ``demo-fmnist`` (the default model),
    ``demo-fmnist-raster``, ``testbed-fmnist`` (the acceleration testbed: VAR's 10 scales, with a refiner)."""
    return Path(__file__).resolve().parents[1] / "assets" / name


def find_model_dir(
    name_or_path: str | Path,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
) -> Path:
    """Where a model is: a bundled model's name (``bundled_model_dir``) unless a path of that name exists, else a
    local folder or a Hugging Face hub repo id (``resolve_model_dir``)."""
    bundled = bundled_model_dir(str(name_or_path))
    if not Path(name_or_path).exists() and bundled.is_dir():
        return bundled
    return resolve_model_dir(name_or_path, revision, local_files_only, cache_dir)


def resolve_model_dir(
    name_or_path: str | Path,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local folder as is; otherwise a Hugging Face hub repo id, downloaded (or found in the HF cache)."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    name = str(name_or_path)
    if p.exists() or name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{name}: not a model folder (expected {INDEX}) and not a hub repo id 'org/name'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a core dependency
        raise CheckpointError(f"{name}: loading from the hub needs huggingface_hub ({e})") from e
    try:
        local = snapshot_download(
            repo_id=name,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            allow_patterns=[INDEX, "*/config.json", f"*/{WEIGHTS}"],
        )
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{name}: not in the local Hugging Face cache and the hub is unreachable (offline, or HF_HUB_OFFLINE=1)"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{name}: could not fetch from the Hugging Face hub: {error_detail(e)}") from e
    return Path(local)
