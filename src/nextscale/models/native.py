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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nextscale import __version__
from nextscale.config import VARConfig, VQVAEConfig
from nextscale.errors import CheckpointError, ConfigError
from nextscale.fileio import atomic_folder
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR
from nextscale.models.weights import build_vae, build_var, check_pair, error_detail

INDEX = "model_index.json"
WEIGHTS = "model.safetensors"
# "refiner": an optional second, smaller transformer on the same tokenizer (collaborative decoding, CoDe).
_COMPONENTS = {"transformer": (VAR, VARConfig), "vae": (VQVAE, VQVAEConfig), "refiner": (VAR, VARConfig)}


def _state_for_saving(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    skip = set(model.derived_buffer_names()) if isinstance(model, VAR) else set()
    out = {}
    for k, v in model.state_dict().items():
        if k not in skip:
            v = v.detach().to("cpu")
            out[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    return out


def _write_component(folder: Path, name: str, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    (folder / name).mkdir()
    cfg = {"_class_name": type(model).__name__, **model.cfg.to_dict()}  # type: ignore[operator]
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
) -> Path:
    """Write ``var`` and ``vae`` as a native model folder at ``path`` (replaced atomically if it exists).

    ``transformer_dtype`` stores the transformer's weights in e.g. float16 to halve the folder (they load
    back into whatever dtype the pipeline uses); the VQ-VAE is always stored as it is. ``components`` adds
    further transformers on the same tokenizer (``{"refiner": small_var}``), stored like the transformer.
    ``files``: text files written beside ``model_index.json`` (e.g. the KV-cache calibration).
    """
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
        _write_component(tmp, "transformer", var, transformer_dtype)
        _write_component(tmp, "vae", vae)
        for name, model in extra.items():
            _write_component(tmp, name, model, transformer_dtype)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    return atomic_folder(Path(path), fill)


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
    if not w_path.is_file():
        raise CheckpointError(f"{w_path}: missing")
    try:
        sd = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return build_var(cfg, sd, str(w_path)) if cls is VAR else build_vae(cfg, sd, str(w_path))


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
