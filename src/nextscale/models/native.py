"""The native model format: a folder, diffusers-style, loadable locally or from the Hugging Face hub.

```
model_index.json            {"_class_name": "<Family>Pipeline", "transformer": ["nextscale", "<Class>"], ...}
transformer/config.json     the component's config, with its "_class_name"
transformer/model.safetensors
vae/config.json
vae/model.safetensors
```
Weights are safetensors (no pickle). Buffers derivable from the config are not stored. Folders are written
to a temporary sibling and renamed into place, so an interrupted save never leaves a half-written model.

This module is the format every family shares (components, index, weights, where a folder is); each family's
components and checks live beside its models (``native_var.py``, ``native_raster.py``), and ``model_index.json``'s
``_class_name`` names the family's pipeline (``pipelines.registry.family_of_folder``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nextscale import __version__
from nextscale.errors import CheckpointError
from nextscale.models.torch_files import error_detail

INDEX = "model_index.json"
WEIGHTS = "model.safetensors"


def _state_for_saving(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    # Buffers a model rebuilds from its config (e.g. VAR's attention mask) are not stored.
    derived = getattr(model, "derived_buffer_names", None)
    skip = set(derived()) if callable(derived) else set()
    out = {}
    for k, v in model.state_dict().items():
        if k not in skip:
            v = v.detach().to("cpu")
            out[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    return out


def write_component(
    folder: Path, name: str, model: torch.nn.Module, dtype: torch.dtype | None = None, config: Any = None
) -> None:
    """``model`` as ``folder/name/``: its config (``config``: another one to write, e.g. with class names) and its
    weights (floating-point ones in ``dtype`` when given)."""
    (folder / name).mkdir()
    cfg = {"_class_name": type(model).__name__, **(config or model.cfg).to_dict()}  # type: ignore[union-attr]
    (folder / name / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(_state_for_saving(model, dtype), str(folder / name / WEIGHTS), metadata={"format": "pt"})


def write_index(folder: Path, class_name: str, extra: dict[str, Any] | None = None) -> None:
    index = {"_class_name": class_name, "_nextscale_version": __version__, **(extra or {})}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def index_class_name(folder: str | Path) -> Any:
    """The pipeline class a model folder's ``model_index.json`` names (which family it holds; None when unnamed)."""
    return read_json(Path(folder) / INDEX).get("_class_name")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing (not a nextscale model folder?)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_weights(w_path: Path) -> dict[str, torch.Tensor]:
    if not w_path.is_file():
        raise CheckpointError(f"{w_path}: missing")
    try:
        return load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


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
