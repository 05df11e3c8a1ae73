"""``VARPipeline``: the user-facing object that loads a VAR + VQ-VAE pair and turns class labels into images.

    pipe = VARPipeline.from_official("var_d16.pth", "vae_ch160v4096z32.pth")
    out = pipe([980, 437], cfg=4.0, top_k=900, top_p=0.95, seed=0)
    out.images[0].save("volcano.png")

One call = one batch through the fast sampler (``engine/var/sampler.py``); ``sampler="reference"`` runs the slow
oracle loop instead. Image i of a call depends only on (seed, i, its label, the sampling settings), not on
the batch it is in (``rng="per_image"``, the default).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from nextscale.editing import keep_maps
from nextscale.engine.sampling import cfg_rows
from nextscale.engine.var.params import ForcedTokens, RngMode, SamplingParams
from nextscale.engine.var.plan import RequestPlan
from nextscale.engine.var.reference import reference_sample
from nextscale.engine.var.sampler import sample_tokens_batch
from nextscale.engine.var.state import ScaleResult
from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.hardware import auto_dtype
from nextscale.images import ImageInput, image_to_tensor, mask_to_tensor, to_pil
from nextscale.labels import resolve_labels
from nextscale.models.native import load_component, load_native, resolve_model_dir, save_native
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR, check_refiner
from nextscale.models.weights import load_official_pair

if TYPE_CHECKING:
    from nextscale.accel import Accel, AccelArg, PlanContext, Resolved

log = logging.getLogger(__name__)
OutputType = Literal["pil", "np", "pt", "latent"]
DEFAULT_SAMPLING: dict[str, Any] = {"cfg": 1.5, "top_k": 0, "top_p": 0.0, "more_smooth": False}
ClassLabels = int | str | Sequence[int | str] | torch.Tensor


BUNDLED_MODELS = ("demo-fmnist", "testbed-fmnist", "demo-fmnist-raster")


KV_ROLES_FILE = "kv_budgets.json"  # a model folder's KV-cache calibration (nextscale calibrate-kv)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def bundled_model_dir(name: str = "demo-fmnist") -> Path:
    """A model shipped inside the package: ``demo-fmnist`` (the default model) or ``testbed-fmnist`` (the
    acceleration testbed: VAR's 10-scale schedule, with a refiner)."""
    return Path(__file__).parent / "assets" / name


@dataclass
class VAROutput:
    """``images``: PIL list, float [N, H, W, C] array in [0, 1] (``np``), [N, C, H, W] tensor (``pt``) or the
    final latents (``latent``). ``tokens``: one LongTensor [N, pn*pn] per scale."""

    images: Any
    tokens: list[torch.Tensor]
    labels: list[int]
    seed: int
    params: SamplingParams
    # ``rows_x_tokens`` (transformer rows x tokens per scale), ``kv_bytes_peak`` (keys/values held at most),
    # ``accel`` (the plug-ins' specs): what the call cost, for comparing acceleration settings; ``resolved``: what
    # ``accel`` asked for and where its specs came from (``describe_accel(accel).as_dict()``).
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScalePreview:
    """Passed to ``callback_on_scale`` after every scale: the new token map and the running latent."""

    scale_index: int
    num_scales: int
    tokens: torch.Tensor
    f_hat: torch.Tensor
    _pipe: VARPipeline = field(repr=False)

    def to_images(self, output_type: OutputType = "pil") -> Any:
        """Decode the partial latent (one VQ-VAE decoder pass): a coarse-to-fine preview."""
        return self._pipe._format(self._pipe.decode_latent(self.f_hat), self.f_hat, output_type)


class VARPipeline:
    def __init__(
        self,
        transformer: VAR,
        vae: VQVAE,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        channels_last_decoder: bool = True,
        sampling_defaults: dict[str, Any] | None = None,
        refiner: VAR | None = None,
        accel_presets: dict[str, list[str]] | None = None,
        kv_roles: dict[str, Any] | None = None,
    ):
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        # CoDe's small model for the late scales (``accel="code"``), and presets tuned for this model.
        self.refiner = None if refiner is None else check_refiner(transformer, refiner).eval().requires_grad_(False)
        self.accel_presets = dict(accel_presets or {})
        self.kv_roles = kv_roles  # KV-cache calibration (``nextscale calibrate-kv``) for scalekv / hack
        self._refiners: dict[str, VAR] = {}  # refiners named in specs (code:refiner=...), loaded once
        self._variants: dict[tuple[str, ...], VAR] = {}  # transformed copies of the transformer (int8), made once
        self.channels_last_decoder = channels_last_decoder
        unknown = set(sampling_defaults or {}) - set(DEFAULT_SAMPLING)
        if unknown:
            raise InvalidInputError(f"unknown sampling_defaults {sorted(unknown)}; allowed: {sorted(DEFAULT_SAMPLING)}")
        # The model's recommended settings (stored in model_index.json), used when a call leaves them unset.
        self.sampling_defaults = {**DEFAULT_SAMPLING, **(sampling_defaults or {})}
        self.to(device, dtype)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_official(
        cls,
        var_path: str | Path,
        vae_path: str | Path,
        patch_nums: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        class_names: Sequence[str] | None = None,
    ) -> VARPipeline:
        """Load the official ``var_d*.pth`` + ``vae_ch160v4096z32.pth`` files as they are."""
        var, vae = load_official_pair(var_path, vae_path, tuple(patch_nums) if patch_nums else None)
        pipe = cls(var, vae, device, dtype)
        if class_names:
            pipe.set_class_names(class_names)
        return pipe

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        revision: str | None = None,
        local_files_only: bool = False,
        cache_dir: str | Path | None = None,
    ) -> VARPipeline:
        """A native model folder or Hugging Face hub repo id (downloaded once into the HF cache); with no
        argument, the bundled demo model."""
        bundled = bundled_model_dir(str(name_or_path or "demo-fmnist"))
        if name_or_path is None or (not Path(name_or_path).exists() and bundled.is_dir()):
            folder = bundled
            if not (folder / "model_index.json").is_file():
                raise CheckpointError(f"no bundled model found at {folder}; pass a model folder or hub id")
        else:
            folder = resolve_model_dir(name_or_path, revision, local_files_only, cache_dir)
        var, vae, index = load_native(folder)
        refiner = load_component(folder, "refiner") if "refiner" in index else None
        assert refiner is None or isinstance(refiner, VAR)
        return cls(
            var,
            vae,
            device,
            dtype,
            sampling_defaults=index.get("sampling_defaults"),
            refiner=refiner,
            accel_presets=index.get("accel_presets"),
            kv_roles=_read_json(folder / KV_ROLES_FILE),
        )

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a native model folder at ``path``, atomically. An earlier model folder there (one with
        ``model_index.json``) is replaced; a file or a folder with other files in it is refused, or with
        ``overwrite=True`` moved aside to ``<name>.old`` (kept, never deleted)."""
        custom = {k: v for k, v in self.sampling_defaults.items() if DEFAULT_SAMPLING.get(k) != v}
        extra: dict[str, Any] = {"sampling_defaults": custom} if custom else {}
        if self.accel_presets:
            extra["accel_presets"] = self.accel_presets
        refiner = {"refiner": self.refiner} if self.refiner is not None else None
        files = {KV_ROLES_FILE: json.dumps(self.kv_roles, indent=1) + "\n"} if self.kv_roles else None
        return save_native(
            path, self.transformer, self.vae, extra or None, components=refiner, files=files, overwrite=overwrite
        )

    def sampling_params(
        self,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        more_smooth: bool | None = None,
        seed: int | None = None,
        rng: RngMode = "per_image",
    ) -> SamplingParams:
        """Settings for a call: the given values, else the model's recommended ones; a random seed if none."""
        d = self.sampling_defaults
        return SamplingParams(
            cfg=d["cfg"] if cfg is None else cfg,
            top_k=d["top_k"] if top_k is None else top_k,
            top_p=d["top_p"] if top_p is None else top_p,
            more_smooth=d["more_smooth"] if more_smooth is None else more_smooth,
            seed=secrets.randbits(63) if seed is None else seed,
            rng=rng,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> VARPipeline:
        """Move to ``device``; ``dtype`` applies to the transformer and the VQ-VAE convs (the quantiser, i.e.
        codebook search and latent accumulation, always stays float32). ``dtype="auto"``: bf16 where it is native
        (GPUs, CPUs with AVX512-BF16 or AMX), float32 elsewhere (``hardware.auto_dtype``)."""
        if device is not None:
            self.device = torch.device(device)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                log.warning("CUDA requested but not available in this torch build or machine; using the CPU")
                self.device = torch.device("cpu")
            for m in self._transformers():
                m.to(self.device)
            self.vae.to(self.device)
        if dtype == "auto":
            dtype = auto_dtype(self.device)
        if dtype is not None:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise InvalidInputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
            self.dtype = dtype
            for m in self._transformers():
                m.to(dtype=dtype)
            for m in (self.vae.encoder, self.vae.decoder, self.vae.quant_conv, self.vae.post_quant_conv):
                m.to(dtype=dtype)
        self._variants.clear()  # transformed copies are remade for the new device and dtype
        if self.channels_last_decoder and self.device.type == "cpu":
            # oneDNN convolutions are ~1.3x faster in NHWC on CPU; tokens are unaffected (decoder only).
            self.vae.decoder.to(memory_format=torch.channels_last)
            self.vae.post_quant_conv.to(memory_format=torch.channels_last)
        return self

    def _transformers(self) -> list[VAR]:
        return [self.transformer, *([] if self.refiner is None else [self.refiner]), *self._refiners.values()]

    def set_class_names(self, names: Sequence[str]) -> None:
        """Name the classes (e.g. for an official ImageNet checkpoint); checked against ``num_classes``."""
        self.transformer.cfg = dataclasses.replace(self.transformer.cfg, class_names=tuple(names))

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.transformer.cfg.class_names

    @property
    def num_classes(self) -> int:
        return self.transformer.num_classes

    @property
    def image_size(self) -> int:
        return self.vae.cfg.image_size

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.transformer.cfg.patch_nums

    def suggested_batch_size(self, kv_budget_mb: float = 1024.0, cap: int = 64) -> int:
        """Images to sample at once: as many as keep the KV caches of one batch within ``kv_budget_mb`` (the
        dominant per-image memory of a batch: both guidance rows, every layer, the whole token pyramid), at most
        ``cap`` (past that, CPU throughput no longer grows with the batch)."""
        c = self.transformer.cfg
        per_image = cfg_rows(1) * 2 * c.depth * c.seq_len * c.embed_dim * self.transformer.head.weight.element_size()
        return max(1, min(cap, int(kv_budget_mb * 2**20 // per_image)))

    def labels(self, class_labels: ClassLabels, num_images_per_label: int = 1) -> torch.Tensor:
        return resolve_labels(class_labels, self.num_classes, self.class_names, num_images_per_label).to(self.device)

    # ---- sampling -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        class_labels: ClassLabels,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        more_smooth: bool | None = None,
        output_type: OutputType = "pil",
        callback_on_scale: Callable[[ScalePreview], None] | None = None,
        num_images_per_label: int = 1,
        rng: RngMode = "per_image",
        sampler: Literal["fast", "reference"] = "fast",
        first_image_index: int = 0,
        image_indices: Sequence[int] | None = None,
        progress: bool = False,
        accel: AccelArg = None,
    ) -> VAROutput:
        """Generate one image per label (times ``num_images_per_label``).

        ``accel``: acceleration plug-ins — spec strings (``"fastvar:keep=0.4"``), plug-in objects, or a preset
        (``"exact"``, ``"balanced"``, ``"fast"``; the model's tuned presets when it has them). Lossy methods change
        the images; ``VAROutput.stats`` reports the work and KV memory the call took.

        Unset sampling settings take the model's recommended values (``sampling_defaults``; VAR's generic
        defaults are cfg=1.5, no top-k/top-p filtering). With ``rng="per_image"`` image i draws from a generator
        seeded by (seed, first_image_index + i) — or by (seed, image_indices[i]) — so any shard of a larger
        job reproduces exactly the images of the whole job.
        """
        labels_B = self.labels(class_labels, num_images_per_label)
        params = self.sampling_params(cfg, top_k, top_p, more_smooth, seed, rng)
        if image_indices is None:
            indices = list(range(first_image_index, first_image_index + labels_B.shape[0]))
        else:
            indices = [int(g) for g in image_indices]
            if len(indices) != labels_B.shape[0]:
                raise InvalidInputError(f"image_indices has {len(indices)} entries for {labels_B.shape[0]} images")
        plan, refiner, transformer = self._plan(accel)
        if sampler == "reference" and plan is not None:
            raise InvalidInputError("sampler='reference' is the exact oracle loop; acceleration needs sampler='fast'")
        out = self._generate(
            labels_B,
            params,
            None,
            output_type,
            callback_on_scale,
            sampler,
            progress,
            indices,
            plan,
            refiner,
            transformer,
        )
        out.stats["resolved"] = self.describe_accel(accel).as_dict()
        return out

    def plan(self, accel: AccelArg) -> RequestPlan | None:
        """The per-scale plan of ``accel`` for this model (None: exact), checked before any sampling."""
        return self._plan(accel)[0]

    def describe_accel(self, accel: AccelArg) -> Resolved:
        """What ``accel`` runs on this model: ``str()`` gives ``"fast -> cfg-cutoff, ... (model's tuned preset)"``,
        ``.specs`` the plug-ins' spec strings in application order (``nextscale.accel.describe``)."""
        from nextscale.accel import describe

        return describe(accel, self._plan_context(self.refiner), self.accel_presets)

    def transformer_for(self, accel: AccelArg) -> VAR:
        """The transformer ``accel`` runs on: the model itself, or its transformed copy (e.g. int8 weights)."""
        return self._plan(accel)[2]

    def _plan(self, accel: AccelArg) -> tuple[RequestPlan | None, VAR | None, VAR]:
        """The plan, the refiner it hands off to, and the transformer it runs on (a transformed copy for methods
        such as int8, made once per method and kept)."""
        from nextscale.accel import build_plan, resolve
        from nextscale.accel.base import transform_key, transform_model

        methods = resolve(accel, self._plan_context(self.refiner), self.accel_presets)
        if not methods:
            return None, None, self.transformer
        refiner = self._refiner_for(methods)
        plan = build_plan(methods, self._plan_context(refiner))
        key = transform_key(methods)
        if key and key not in self._variants:
            self._variants[key] = transform_model(methods, self.transformer)
        transformer = self._variants[key] if key else self.transformer
        return plan, refiner if plan.uses_refiner else None, transformer

    def _plan_context(self, refiner: VAR | None) -> PlanContext:
        from nextscale.accel import PlanContext

        var = self.transformer
        depth = None if refiner is None else refiner.depth
        return PlanContext(self.patch_nums, var.depth, depth, var.num_heads, self.kv_roles)

    def _refiner_for(self, methods: Sequence[Accel]) -> VAR | None:
        """The refiner a method names (``code:refiner=DIR_OR_HUB_ID``, loaded once), else the model's own."""
        named = [m.refiner for m in methods if getattr(m, "refiner", "")]
        if not named:
            return self.refiner
        if named[0] not in self._refiners:
            folder = resolve_model_dir(named[0])
            refiner = load_component(folder, "refiner" if (folder / "refiner").is_dir() else "transformer")
            assert isinstance(refiner, VAR)
            self._refiners[named[0]] = check_refiner(self.transformer, refiner).to(self.device, self.dtype).eval()
        return self._refiners[named[0]]

    @torch.inference_mode()
    def edit(
        self,
        image: ImageInput,
        mask: ImageInput,
        class_label: int | str | None = None,
        cfg: float = 3.0,
        top_k: int = 0,
        top_p: float = 0.95,
        seed: int | None = None,
        more_smooth: bool = False,
        num_images: int = 1,
        output_type: OutputType = "pil",
        callback_on_scale: Callable[[ScalePreview], None] | None = None,
    ) -> VAROutput:
        """Zero-shot in-/out-painting and class-conditional editing (VAR paper Sec. 4.6).

        ``mask`` is 1 (white) where new content is generated and 0 (black) where ``image`` is kept; the
        input's tokens are forced under the kept region at every scale. ``class_label=None`` edits
        unconditionally (in-/out-painting); a class makes it class-conditional editing.
        """
        size, ch = self.image_size, self.vae.cfg.in_channels
        img = image_to_tensor(image, size, ch).to(self.device)
        keep_hw = 1.0 - mask_to_tensor(mask, size)
        labels_B = self.labels(-1 if class_label is None else class_label, num_images)
        idx_list = self.encode(img)
        forced = ForcedTokens(
            idx=[i.expand(num_images, -1) for i in idx_list],
            keep=[k.to(self.device) for k in keep_maps(keep_hw, self.patch_nums, num_images)],
        )
        params = SamplingParams(
            cfg=cfg,
            top_k=top_k,
            top_p=top_p,
            more_smooth=more_smooth,
            seed=secrets.randbits(63) if seed is None else seed,
        )
        return self._generate(labels_B, params, forced, output_type, callback_on_scale, "fast", False)

    def _generate(
        self,
        labels_B: torch.Tensor,
        params: SamplingParams,
        forced: ForcedTokens | None,
        output_type: OutputType,
        callback: Callable[[ScalePreview], None] | None,
        sampler: str,
        progress: bool,
        indices: Sequence[int] | None = None,
        plan: RequestPlan | None = None,
        refiner: VAR | None = None,
        transformer: VAR | None = None,
    ) -> VAROutput:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InvalidInputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        params.check_vocab(self.transformer.V)
        gens = params.generators(labels_B.shape[0], self.device, indices=indices)
        bar = _progress_bar(len(self.patch_nums)) if progress else None

        def on_scale(r: ScaleResult) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                # A preview owns its latent: the running one keeps changing in place, and a caller may decode the
                # previews after the call (a copy of a few KB per image, nothing next to a transformer step).
                callback(ScalePreview(r.si, r.num_scales, r.idx_Bl, r.f_hat_BChw.clone(), self))

        if sampler not in ("fast", "reference"):
            raise InvalidInputError(f"sampler must be 'fast' or 'reference', got {sampler!r}")
        try:
            if sampler == "reference":
                res = reference_sample(self.transformer, self.vae, labels_B, params, gens, forced)
            else:
                res = sample_tokens_batch(
                    transformer or self.transformer,
                    self.vae.quantize,
                    labels_B,
                    params,
                    gens,
                    forced,
                    on_scale if (callback or bar) else None,
                    plan,
                    refiner,
                )
        finally:
            if bar is not None:
                bar.close()
        f_hat = res.f_hat_BChw
        images = None if output_type == "latent" else self.decode_latent(f_hat)
        out = self._format(images, f_hat, output_type)
        return VAROutput(out, res.tokens, labels_B.tolist(), params.seed or 0, params, res.stats)

    # ---- tokenizer helpers ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> one token map [B, pn*pn] per scale."""
        f = self.vae.encode(images_BChw.to(self.device, self.vae.quant_conv.weight.dtype))
        return self.vae.quantize.quantize(f.float())[0]

    @torch.inference_mode()
    def decode_tokens(self, tokens: Sequence[torch.Tensor], output_type: OutputType = "pil") -> Any:
        f_hat = self.vae.quantize.idx_to_fhat([t.to(self.device) for t in tokens])
        return self._format(self.decode_latent(f_hat), f_hat, output_type)

    def decode_latent(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent -> images [B, C, H, W] in [0, 1] (float32)."""
        return self.vae.decode_images(f_hat_BChw)

    def _format(self, images: torch.Tensor | None, f_hat: torch.Tensor, output_type: OutputType) -> Any:
        if output_type == "latent" or images is None:
            return f_hat
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        return to_pil(images)


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scales", unit="scale", leave=False)


__all__ = ["ScalePreview", "VAROutput", "VARPipeline"]
