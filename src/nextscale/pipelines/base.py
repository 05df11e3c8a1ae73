"""What every pipeline shares, as diffusers' ``DiffusionPipeline`` does for its pipelines: moves to a device and
dtype, class labels and their names, image indices, output formats, the model's stored sampling defaults, where a
model folder is, and the settings ``save_pretrained`` writes beside the weights.

A family's pipeline (``var.py``, ``raster.py``) derives from ``Pipeline`` and keeps what is its own: construction
from its files, ``__call__``, its tokenizer helpers, and which modules a move carries (``_place``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from nextscale.engine.params import SeededParams
from nextscale.engine.sampling import cfg_rows
from nextscale.errors import ConfigError, InvalidInputError
from nextscale.hardware import auto_dtype
from nextscale.images import to_pil
from nextscale.labels import resolve_labels
from nextscale.models.native import find_model_dir

log = logging.getLogger(__name__)

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")
ClassLabels = int | str | Sequence[int | str] | torch.Tensor
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
P = TypeVar("P", bound="Pipeline")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Pipeline:
    """The shared machinery. A family sets ``family`` and ``default_sampling`` (its generic sampling settings,
    which a model folder's ``sampling_defaults`` override), and implements ``sampling_params`` / ``call_kwargs``
    (its settings -> its params object; ``call_kwargs`` is the way back) and ``_place`` (moving and casting its
    modules)."""

    # The family's registration facts (``pipelines.registry``): its name in model_index.json and in messages, the
    # from_official options a checkpoint file cannot tell, and the official files it reads.
    family: ClassVar[str]
    family_title: ClassVar[str]
    official_options: ClassVar[tuple[str, ...]]
    official_files: ClassVar[str]
    default_sampling: ClassVar[Mapping[str, Any]]
    # The family's own keywords of ``__call__`` that ``nextscale generate`` passes through (its flags, e.g.
    # ``speculative`` -> ``--speculative``); another family's are refused in one line.
    sampling_options: ClassVar[tuple[str, ...]] = ()
    # Which of them is the acceleration setting, whose meaning ``describe_accel`` tells (presets resolved).
    accel_option: ClassVar[str | None] = None

    transformer: nn.Module
    device: torch.device
    dtype: torch.dtype
    sampling_defaults: dict[str, Any]
    # The one home of the class names, for both families (``set_class_names``); a VAR folder stores them in its
    # transformer's config.json, a raster folder in model_index.json.
    class_names: tuple[str, ...]

    def _init_settings(self, sampling_defaults: Mapping[str, Any] | None, class_names: Sequence[str]) -> None:
        """The model's recommended settings (stored in model_index.json), used when a call leaves them unset, checked
        here (a bad stored value fails at load, not at the first call); and its class names."""
        unknown = set(sampling_defaults or {}) - set(self.default_sampling)
        if unknown:
            allowed = sorted(self.default_sampling)
            raise InvalidInputError(f"unknown sampling_defaults {sorted(unknown)}; allowed: {allowed}")
        self.sampling_defaults = {**self.default_sampling, **(sampling_defaults or {})}
        self.sampling_params(seed=0)
        self.class_names = ()
        if class_names:
            self.set_class_names(class_names)

    # ---- settings ---------------------------------------------------------------------------------------------
    def sampling_params(self, *args: Any, **kwargs: Any) -> SeededParams:
        """Settings for a call: the given values, else the model's recommended ones; a random seed if none."""
        raise NotImplementedError

    def call_kwargs(self, params: SeededParams) -> dict[str, Any]:
        """The keywords of a call that samples with ``params`` (``pipe(labels, **pipe.call_kwargs(params))``):
        the inverse of ``sampling_params``."""
        return params.as_settings()

    def checked_settings(self, settings: dict[str, Any], batch: int) -> dict[str, Any]:
        """``settings`` (a call's keywords, the family's ``sampling_options`` included) checked before any sampling,
        so that a bad value or an impossible combination fails before the work. ``batch``: how many images each call
        will sample (a setting that does not pay at that size is logged)."""
        return settings

    def _settings(self, **given: Any) -> dict[str, Any]:
        """``given`` with every None replaced by the model's recommended value."""
        return {k: self.sampling_defaults[k] if v is None else v for k, v in given.items()}

    @staticmethod
    def _seed(seed: int | None) -> int:
        """``seed``, or a fresh random one."""
        return secrets.randbits(63) if seed is None else seed

    # ---- class labels -----------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.transformer.num_classes)  # type: ignore[arg-type]

    def set_class_names(self, names: Sequence[str]) -> None:
        """Name the classes (e.g. ImageNet's for an official checkpoint); checked against ``num_classes``."""
        names = tuple(str(n) for n in names)
        if len(names) != self.num_classes:
            raise InvalidInputError(f"{len(names)} class names given for a model of {self.num_classes} classes")
        self.class_names = names

    def labels(self, class_labels: ClassLabels, num_images_per_label: int = 1) -> torch.Tensor:
        """Class indices or names (``-1``/``"null"``: unconditional) -> a LongTensor of indices on the device."""
        return resolve_labels(class_labels, self.num_classes, self.class_names, num_images_per_label).to(self.device)

    def suggested_batch_size(self, kv_budget_mb: float = 1024.0, cap: int = 64) -> int:
        """Images to sample at once: as many as keep the KV cache of one batch within ``kv_budget_mb`` (the dominant
        per-image memory of a batch: both guidance rows, every layer, every position; ``kv_row_bytes`` of the
        model), at most ``cap`` (past that, CPU throughput no longer grows with the batch)."""
        per_image = cfg_rows(1) * int(self.transformer.kv_row_bytes())  # type: ignore[operator]
        return max(1, min(cap, int(kv_budget_mb * 2**20 // per_image)))

    @staticmethod
    def _image_indices(count: int, first_image_index: int, image_indices: Sequence[int] | None) -> list[int]:
        """Each image's index in its job (what its generator is seeded from): ``first_image_index`` on, or as given."""
        if image_indices is None:
            return list(range(first_image_index, first_image_index + count))
        indices = [int(g) for g in image_indices]
        if len(indices) != count:
            raise InvalidInputError(f"image_indices has {len(indices)} entries for {count} images")
        return indices

    # ---- outputs ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")

    @staticmethod
    def _format_images(images_BChw: torch.Tensor, output_type: OutputType) -> Any:
        """Images [B, C, H, W] in [0, 1] -> the requested type: the tensor (``pt``), a float [B, H, W, C] array
        (``np``) or a list of PIL images."""
        if output_type == "pt":
            return images_BChw
        if output_type == "np":
            return images_BChw.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        return to_pil(images_BChw)

    # ---- device and dtype -------------------------------------------------------------------------------------
    def to(self: P, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> P:
        """Move to ``device`` (CUDA where it is unavailable falls back to the CPU, with a logged message) and cast
        to ``dtype``: float32, bfloat16, float16, or ``"auto"`` — bf16 where it is native (GPUs, CPUs with
        AVX512-BF16 or AMX), float32 elsewhere (``hardware.auto_dtype``). Which modules take the dtype is the
        family's choice (its tokenizer may stay float32)."""
        target = self.device if device is None else torch.device(device)
        if target.type == "cuda" and not torch.cuda.is_available():
            log.warning("CUDA requested but not available in this torch build or machine; using the CPU")
            target = torch.device("cpu")
        if dtype == "auto":
            dtype = auto_dtype(target)
        if dtype is not None and dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        assert dtype is None or isinstance(dtype, torch.dtype)
        if device is not None:
            self.device = target
        if dtype is not None:
            self.dtype = dtype
        self._place(target if device is not None else None, dtype)
        return self

    def _place(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """Move the family's modules to ``device`` and cast them to ``dtype`` (None: unchanged)."""
        raise NotImplementedError

    # ---- transformed copies (acceleration methods that change the model: int8) ----------------------------------
    # A family with such methods sets ``self._variants = {}`` and clears it in ``_place``; ``transformer_for(accel)``
    # and ``transform_specs(accel)`` are its own (they resolve its presets).
    _variants: dict[tuple[str, ...], nn.Module]

    def transformed(self, key: tuple[str, ...], make: Callable[[Any], Any]) -> Any:
        """The transformer as the methods ``key`` change it (e.g. int8 weights): ``make(transformer)``, made once per
        device and dtype and kept."""
        if key not in self._variants:
            self._variants[key] = make(self.transformer)
        return self._variants[key]

    def transformer_for(self, accel: Any) -> nn.Module:
        raise NotImplementedError

    def transform_specs(self, accel: Any) -> tuple[str, ...]:
        """The spec strings of ``accel``'s methods that change the model (``accel.base.transform_key``)."""
        raise NotImplementedError

    def server_wide_methods(self, levels: Mapping[str, Any]) -> tuple[str, ...]:
        """The model-changing methods (int8) of the server's default level ``"auto"``, as spec strings: one engine runs
        one transformer, so every level runs on it and reports them; a level whose method changes the model in
        another way is refused."""
        served = self.transformer_for(levels.get("auto"))
        for q, name in levels.items():
            if self.transformer_for(name) not in (served, self.transformer):
                raise ConfigError(
                    f"quality {q!r} ({name}) runs a transformed model (e.g. int8) that the server does not; "
                    f"add that method to serve --accel"
                )
        return self.transform_specs(levels.get("auto"))

    # ---- folders ----------------------------------------------------------------------------------------------
    @staticmethod
    def _model_folder(
        name_or_path: str | Path,
        revision: str | None = None,
        local_files_only: bool = False,
        cache_dir: str | Path | None = None,
    ) -> Path:
        """A bundled model's name, a local folder or a hub repo id -> the model folder (``models.native``)."""
        return find_model_dir(name_or_path, revision, local_files_only, cache_dir)

    def _saved_settings(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes into model_index.json beside the weights: the sampling defaults that
        differ from the family's generic ones (the family adds its own presets)."""
        custom = {k: v for k, v in self.sampling_defaults.items() if self.default_sampling.get(k) != v}
        return {"sampling_defaults": custom} if custom else {}
