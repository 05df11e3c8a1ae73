"""``VARPipeline``: the user-facing object that loads a VAR + VQ-VAE pair and turns class labels into images.

    pipe = VARPipeline.from_official("var_d16.pth", "vae_ch160v4096z32.pth")
    out = pipe([980, 437], cfg=4.0, top_k=900, top_p=0.95, seed=0)
    out.images[0].save("volcano.png")

One call = one batch through the fast sampler (``engine/var/sampler.py``); ``sampler="reference"`` runs the slow
oracle loop instead. Image i of a call depends only on (seed, i, its label, the sampling settings), not on
the batch it is in (``rng="per_image"``, the default).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from nextscale.editing import keep_maps
from nextscale.engine.params import RngMode
from nextscale.engine.var.params import ForcedTokens, SamplingParams
from nextscale.engine.var.plan import RequestPlan
from nextscale.engine.var.reference import reference_sample
from nextscale.engine.var.sampler import sample_tokens_batch
from nextscale.engine.var.state import ScaleResult
from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.images import ImageInput, image_to_tensor, mask_to_tensor
from nextscale.models.native import resolve_model_dir
from nextscale.models.native_var import load_component, load_native, save_native
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR, check_refiner
from nextscale.models.weights import load_official_pair
from nextscale.pipelines.base import ClassLabels, OutputType, Pipeline, count_params

if TYPE_CHECKING:
    from nextscale.accel import AccelArg, Prepared, Resolved
    from nextscale.engine.family import QualityPlan
    from nextscale.engine.var.family import VARFamily

log = logging.getLogger(__name__)
DEFAULT_SAMPLING: dict[str, Any] = {"cfg": 1.5, "top_k": 0, "top_p": 0.0, "more_smooth": False}
KV_ROLES_FILE = "kv_budgets.json"
# Tensors only VAR's files hold (other families share word_embed, head, encoder.conv_in, ...).
VAR_ONLY_KEYS = (
    "class_emb.weight",
    "pos_1LC",
    "quant_conv.weight",
    "post_quant_conv.weight",
)  # a model folder's KV-cache calibration (nextscale calibrate-kv)


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


class VARPipeline(Pipeline):
    # The family's registration facts (``pipelines.registry``): its name in model_index.json and messages, the
    # from_official options a checkpoint file cannot tell, and the official files it reads.
    family = "var"
    family_title = "VAR (next-scale)"
    official_options = ("patch_nums",)
    official_files = "var_d*.pth + vae_ch160v4096z32.pth"
    sampling_options = ("accel", "more_smooth", "sampler")
    accel_option = "accel"
    default_sampling = DEFAULT_SAMPLING
    transformer: VAR

    @classmethod
    def claims_file(cls, path: str | Path) -> int:
        """2 for a VAR transformer or multi-scale VQ-VAE checkpoint with names no other family's files have (the
        class embedding, the absolute positions, the VQ projections), 1 for one that only shares names (a partial
        file: the loader then names what is missing), else 0."""
        from nextscale.models.weights import is_var_state_dict, read_state_dict

        try:
            sd = read_state_dict(Path(path))
        except (CheckpointError, OSError):
            return 0
        if not is_var_state_dict(sd):
            return 0
        return 2 if any(k in sd for k in VAR_ONLY_KEYS) else 1

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
        class_names: Sequence[str] | None = None,
    ):
        """``class_names``: default the transformer's own (``VARConfig.class_names``, as a model folder stores
        them)."""
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        # CoDe's small model for the late scales (``accel="code"``), and presets tuned for this model.
        self.refiner = None if refiner is None else check_refiner(transformer, refiner).eval().requires_grad_(False)
        self.accel_presets = dict(accel_presets or {})
        self.kv_roles = kv_roles  # KV-cache calibration (``nextscale calibrate-kv``) for scalekv / hack
        self._refiners: dict[str, VAR] = {}  # refiners named in specs (code:refiner=...), loaded once
        self._variants = {}  # transformed copies of the transformer (int8), made once
        self.channels_last_decoder = channels_last_decoder
        self._init_settings(sampling_defaults, transformer.cfg.class_names if class_names is None else class_names)
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
        folder = cls._model_folder(name_or_path or "demo-fmnist", revision, local_files_only, cache_dir)
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
        ``overwrite=True`` moved aside to ``<name>.old`` (kept, never deleted). The class names go into the
        transformer's ``config.json``, where VAR folders have always kept them."""
        extra = self._saved_settings()
        if self.accel_presets:
            extra["accel_presets"] = self.accel_presets
        refiner = {"refiner": self.refiner} if self.refiner is not None else None
        files = {KV_ROLES_FILE: json.dumps(self.kv_roles, indent=1) + "\n"} if self.kv_roles else None
        return save_native(
            path,
            self.transformer,
            self.vae,
            extra or None,
            components=refiner,
            files=files,
            overwrite=overwrite,
            class_names=self.class_names,
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
        settings = self._settings(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
        return SamplingParams(**settings, seed=self._seed(seed), rng=rng)

    def _place(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """The transformers (the refiners included) take ``dtype``, and so do the VQ-VAE's convs; its quantiser
        (codebook search and latent accumulation) always stays float32."""
        if device is not None:
            for m in self._transformers():
                m.to(device)
            self.vae.to(device)
        if dtype is not None:
            for m in self._transformers():
                m.to(dtype=dtype)
            for m in (self.vae.encoder, self.vae.decoder, self.vae.quant_conv, self.vae.post_quant_conv):
                m.to(dtype=dtype)
        self._variants.clear()  # transformed copies are remade for the new device and dtype
        if self.channels_last_decoder and self.device.type == "cpu":
            # oneDNN convolutions are ~1.3x faster in NHWC on CPU; tokens are unaffected (decoder only).
            self.vae.decoder.to(memory_format=torch.channels_last)
            self.vae.post_quant_conv.to(memory_format=torch.channels_last)

    def _transformers(self) -> list[VAR]:
        return [self.transformer, *([] if self.refiner is None else [self.refiner]), *self._refiners.values()]

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.vae.cfg.image_size

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.transformer.cfg.patch_nums

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
        indices = self._image_indices(labels_B.shape[0], first_image_index, image_indices)
        plan, refiner, transformer = self._prepare(accel)
        if sampler == "reference" and plan is not None:
            raise InvalidInputError("sampler='reference' is the exact oracle loop; acceleration needs sampler='fast'")
        out = self._generate(
            labels_B,
            params,
            output_type=output_type,
            callback=callback_on_scale,
            sampler=sampler,
            progress=progress,
            indices=indices,
            plan=plan,
            refiner=refiner,
            transformer=transformer,
        )
        out.stats["resolved"] = self.describe_accel(accel).as_dict()
        return out

    @classmethod
    def describe_model(cls, path: Path, patch_nums: tuple[int, ...] | None = None) -> dict[str, Any]:
        """What ``nextscale info`` shows of a VAR model folder or official file: format, family, each part's
        parameter count and configuration."""
        from nextscale.config import VARConfig, VQVAEConfig
        from nextscale.models.weights import infer_vae_config, infer_var_config, read_state_dict

        if path.is_dir():
            var, vae, _index = load_native(path)
            return {
                "format": "native",
                "family": cls.family,
                "path": str(path),
                "transformer": {"params": count_params(var), "config": var.cfg.to_dict()},
                "vae": {"params": count_params(vae), "config": vae.cfg.to_dict()},
            }
        sd = read_state_dict(path)
        cfg: VARConfig | VQVAEConfig
        try:
            cfg = infer_var_config(sd, patch_nums, str(path))
            kind = "transformer"
        except CheckpointError as var_err:
            try:
                cfg = infer_vae_config(sd, patch_nums, str(path))
                kind = "vae"
            except CheckpointError:
                raise var_err from None
        # Counted on a meta-device model, not over the file's tensors (which include buffers): the same number
        # `info` shows for the folder `convert` makes of this file.
        with torch.device("meta"):
            params = count_params(VAR(cfg) if isinstance(cfg, VARConfig) else VQVAE(cfg))
        return {
            "format": "official",
            "family": cls.family,
            "path": str(path),
            kind: {"params": params, "tensors": len(sd), "config": cfg.to_dict()},
        }

    def checked_settings(self, settings: dict[str, Any], batch: int) -> dict[str, Any]:
        s = settings
        self.sampling_params(s.get("cfg"), s.get("top_k"), s.get("top_p"), s.get("more_smooth"), s.get("seed"))
        accel = s.get("accel")
        self.plan(accel)  # an unknown or impossible combination fails here, before any sampling
        return settings

    def plan(self, accel: AccelArg) -> RequestPlan | None:
        """The per-scale plan of ``accel`` for this model (None: exact), checked before any sampling."""
        return self._prepare(accel).plan

    def describe_accel(self, accel: AccelArg) -> Resolved:
        """What ``accel`` runs on this model: ``str()`` gives ``"fast -> cfg-cutoff, ... (model's tuned preset)"``,
        ``.specs`` the plug-ins' spec strings in application order (``nextscale.accel.describe``)."""
        from nextscale.accel import describe_setting

        return describe_setting(accel, self)

    def transformer_for(self, accel: AccelArg) -> VAR:
        """The transformer ``accel`` runs on: the model itself, or its transformed copy (e.g. int8 weights)."""
        return self._prepare(accel).transformer

    def transform_specs(self, accel: AccelArg) -> tuple[str, ...]:
        from nextscale.accel import parse_spec

        return tuple(n for n in self.describe_accel(accel).specs if parse_spec(n).transforms_model)

    # ---- serving ------------------------------------------------------------------------------------------------
    def engine_family(self, accel: AccelArg = None) -> VARFamily:
        """This model as the serving engine runs it; ``accel``: the server's default, whose model-changing methods
        (int8) every request then runs on."""
        from nextscale.engine.var.family import VARFamily

        served = self.transformer_for(accel)
        if served is not self.transformer:
            log.info("serving a transformed model for every quality level (%s)", accel)
        return VARFamily(served, self.vae, refiner=self.refiner, class_names=self.class_names)

    def quality_plans(self, levels: Mapping[str, AccelArg]) -> dict[str, QualityPlan]:
        """The plan of each level (``{"auto": serve --accel, "high": "exact", ...}``) and what it runs. One engine
        runs one transformer: a level whose method changes the model (int8) must be the server's ``auto`` too."""
        from nextscale.engine.family import QualityPlan

        server_wide = self.server_wide_methods(levels)
        out = {}
        for q, name in levels.items():
            plan = self.plan(name)
            names = plan.names if plan else ()
            out[q] = QualityPlan(plan, (*(n for n in server_wide if n not in names), *names))
        return out

    def _prepare(self, accel: AccelArg) -> Prepared:
        """The plan of ``accel``, the refiner it hands off to, and the transformer it runs on (``accel.prepare``)."""
        from nextscale.accel import prepare

        return prepare(accel, self)

    # ---- what nextscale.accel.prepare asks of this model (an ``AccelModel``) -------------------------------------
    def load_refiner(self, name: str) -> VAR:
        """The refiner a spec names (``code:refiner=DIR_OR_HUB_ID``), loaded once onto this pipeline's device and
        dtype (and moved with it)."""
        if name not in self._refiners:
            folder = resolve_model_dir(name)
            refiner = load_component(folder, "refiner" if (folder / "refiner").is_dir() else "transformer")
            assert isinstance(refiner, VAR)
            self._refiners[name] = check_refiner(self.transformer, refiner).to(self.device, self.dtype).eval()
        return self._refiners[name]

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
        params = SamplingParams(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, seed=self._seed(seed))
        return self._generate(labels_B, params, forced=forced, output_type=output_type, callback=callback_on_scale)

    def _generate(
        self,
        labels_B: torch.Tensor,
        params: SamplingParams,
        *,
        forced: ForcedTokens | None = None,
        output_type: OutputType = "pil",
        callback: Callable[[ScalePreview], None] | None = None,
        sampler: str = "fast",
        progress: bool = False,
        indices: Sequence[int] | None = None,
        plan: RequestPlan | None = None,
        refiner: VAR | None = None,
        transformer: VAR | None = None,
    ) -> VAROutput:
        """One batch through the fast sampler (``plan``, ``refiner`` and ``transformer`` as ``accel.prepare`` gives
        them) or the reference loop; ``forced``: known tokens (``edit``); ``indices``: each image's index in its job
        (default 0 .. B-1)."""
        self._check_output_type(output_type)
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
        """Images in [0, 1] as ``output_type`` asks; the latent itself for ``"latent"``."""
        if output_type == "latent" or images is None:
            return f_hat
        return self._format_images(images, output_type)


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scales", unit="scale", leave=False)


__all__ = ["ScalePreview", "VAROutput", "VARPipeline"]
