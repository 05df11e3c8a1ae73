"""``InfinityPipeline``: prompts in, images out, with the official Infinity models (FoundationVision, text-to-image
next-scale prediction over a bitwise BSQ tokenizer; Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling
for High-Resolution Image Synthesis", CVPR 2025).

Loads the released files unchanged (``from_official``) or a native folder (``from_pretrained``); prompts go through
the T5 encoder once per call; each image draws from its own generator (``rng="per_image"``) or the batch from one
(``rng="official"``, the official stream); images come back RGB (the official code returns BGR for cv2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from nextscale.engine.infinity.params import InfinityParams
from nextscale.engine.infinity.reference import ScaleStep, reference_sample
from nextscale.engine.infinity.state import InfinityGeneration, SchedulePlans, check_request, own_cache, request_rows
from nextscale.engine.params import RngMode
from nextscale.engine.var.plan import RequestPlan
from nextscale.errors import CheckpointError, ConfigError, InvalidInputError
from nextscale.models.infinity import Infinity, InfinityConfig
from nextscale.models.infinity_scales import (
    H_DIV_W_TEMPLATES,
    PN_SCALES,
    InfinitySchedule,
    Size,
    parse_size,
    schedule,
    template_sizes,
)
from nextscale.models.native_infinity import load_infinity_native, save_infinity_native, text_encoder_parts
from nextscale.models.text_encoder import DEFAULT_T5, TextEncoder, TextFeatures
from nextscale.models.tokenizers.bsq import BSQVAE
from nextscale.pipelines.base import OutputType, Pipeline, count_params

if TYPE_CHECKING:
    from nextscale.accel import Accel, AccelArg, PlanContext, Resolved
    from nextscale.engine.family import QualityPlan
    from nextscale.engine.infinity.family import InfinityFamily

log = logging.getLogger(__name__)

# The official scripts' settings (tools/run_infinity.py gen_one_img; README: cfg 3, tau 0.5) and the 2B's 1M pixels.
# "size": the default image size ("WIDTHxHEIGHT" or "W:H"; None = square), for models trained on another shape.
DEFAULT_SAMPLING: dict[str, Any] = {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97, "pn": "1M", "size": None}


@dataclass
class InfinityOutput:
    """``images``: PIL list, float [B, H, W, C] array in [0, 1] (``np``), [B, C, H, W] tensor (``pt``) or the summed
    codes [B, d, H_lat, W_lat] (``latent``). ``bits``: one tensor [B, h, w, d] (0/1) per sampled scale.
    ``stats["schedule"]``: the template and pixel budget that ran, the image size, and the size asked for."""

    images: Any
    bits: list[torch.Tensor]
    prompts: list[str]
    seed: int
    params: InfinityParams
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class InfinityScalePreview:
    """Passed to ``callback_on_scale`` after every scale: that scale's bits and the running latent."""

    scale_index: int
    num_scales: int
    bits: torch.Tensor
    summed_codes: torch.Tensor | None
    _pipe: InfinityPipeline = field(repr=False)

    def to_images(self, output_type: OutputType = "pil") -> Any:
        """Decode the latent so far (one tokenizer decoder pass): a coarse-to-fine preview."""
        if self.summed_codes is None:
            raise InvalidInputError("this scale's preview has no latent to decode")
        return self._pipe._format(self._pipe.decode_latent(self.summed_codes), output_type)


def _pool_len(pn: str) -> int:
    """Positions per row of the engine's KV pool serving ``pn`` (the longest schedule of its templates)."""
    return max(schedule(t, pn).seq_len for t in H_DIV_W_TEMPLATES)


def pn_from_name(path: str | Path) -> str | None:
    """The pixel budget a release's file name states (``infinity_125M_256x256.pth``), if any."""
    m = re.search(r"_(\d+)x(\d+)", Path(path).name)
    if not m:
        return None
    side = int(m.group(1))
    return {256: "0.06M", 512: "0.25M", 768: "0.60M", 1024: "1M"}.get(side)


class InfinityPipeline(Pipeline):
    family = "infinity"
    family_title = "text-to-image next-scale (Infinity)"
    official_options = ("text_encoder",)
    official_files = "infinity_*.pth (or a shard folder) + infinity_vae_*.pth"
    sampling_options = ("accel", "negative_prompt", "tau", "size", "pn", "sampler")
    accel_option = "accel"
    default_sampling = DEFAULT_SAMPLING
    transformer: Infinity

    @classmethod
    def claims_file(cls, path: str | Path) -> int:
        """2 for an Infinity transformer (file or shard folder: the learned null text and the text pool) or a BSQ-VAE
        file (its configuration reads from the shapes), else 0."""
        from nextscale.models.infinity_weights import (
            infer_bsq_config,
            looks_like_infinity,
            read_bsq_state_dict,
            read_infinity_state_dict,
        )

        try:
            if looks_like_infinity(read_infinity_state_dict(path)):
                return 2
        except (CheckpointError, OSError):
            pass
        try:
            infer_bsq_config(read_bsq_state_dict(path), str(path))
            return 2
        except (CheckpointError, ConfigError, OSError, KeyError, ValueError):
            return 0

    def __init__(
        self,
        transformer: Infinity,
        vae: BSQVAE,
        text_encoder: TextEncoder,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        sampling_defaults: dict[str, Any] | None = None,
        text_encoder_source: str | None = None,
        accel_presets: dict[str, list[str]] | None = None,
    ):
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        if text_encoder.channels != transformer.cfg.text_channels:
            raise CheckpointError(
                f"the text encoder gives {text_encoder.channels} channels; the transformer reads "
                f"{transformer.cfg.text_channels}"
            )
        # Where the text encoder came from when it is not stored with the model (a hub id): what save_pretrained
        # writes instead of 11 GB of T5 weights.
        self.text_encoder_source = text_encoder_source
        # A model's own presets (model_index.json "accel_presets": chosen by measuring it), over the built-in ones.
        self.accel_presets = dict(accel_presets or {})
        self._variants = {}  # transformed copies of the transformer (int8), made once
        self._init_settings(sampling_defaults, ())
        self.schedule()  # a bad stored default size or pixel budget fails at load, not at the first call
        self.to(device, dtype)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_official(
        cls,
        transformer_path: str | Path,
        vae_path: str | Path,
        text_encoder: str | Path | TextEncoder = DEFAULT_T5,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        pn: str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> InfinityPipeline:
        """The released files as they are: ``infinity_2b_reg.pth`` (or the 8B's shard folder, or the 125M file)
        with ``infinity_vae_d32reg.pth`` (or ``infinity_vae_d56_f8_14_patchify.pth``); ``text_encoder`` a T5
        folder or hub id (default ``google/flan-t5-xl``) or a loaded ``TextEncoder``. ``pn``: the pixel budget to
        sample at by default: the file name's ``_256x256`` / ``_512x512`` (the 125M and 8B-512 releases) gives
        "0.06M" / "0.25M", else "1M" (the 2B is trained for it)."""
        from nextscale.models.infinity_weights import load_official_infinity_pair

        if class_names:
            raise InvalidInputError("an Infinity model takes prompts, not class names")
        transformer, vae = load_official_infinity_pair(transformer_path, vae_path)
        source = None if isinstance(text_encoder, TextEncoder) else str(text_encoder)
        encoder = text_encoder if isinstance(text_encoder, TextEncoder) else TextEncoder.from_pretrained(source or "")
        pn = pn or pn_from_name(transformer_path)
        defaults = None if pn is None else {"pn": pn}
        return cls(transformer, vae, encoder, device, dtype, defaults, text_encoder_source=source)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        revision: str | None = None,
        local_files_only: bool = False,
        cache_dir: str | Path | None = None,
    ) -> InfinityPipeline:
        """A native Infinity folder, a bundled model's name or a Hugging Face hub repo id. A text encoder named by
        hub id in ``model_index.json`` loads from the HF cache (downloaded once)."""
        folder = cls._model_folder(name_or_path, revision, local_files_only, cache_dir)
        transformer, vae, source, index = load_infinity_native(folder)
        encoder_path, tokenizer_path = text_encoder_parts(folder, source)
        encoder = TextEncoder.from_pretrained(encoder_path, tokenizer=tokenizer_path)
        stored = encoder_path != source or Path(source).parent == folder
        return cls(
            transformer,
            vae,
            encoder,
            device,
            dtype,
            sampling_defaults=index.get("sampling_defaults"),
            text_encoder_source=None if stored else source,
            accel_presets=index.get("accel_presets"),
        )

    def save_pretrained(
        self, path: str | Path, transformer_dtype: torch.dtype | None = None, overwrite: bool = False
    ) -> Path:
        """Write a native folder that ``from_pretrained`` loads with no arguments: the transformer, the tokenizer,
        and the text encoder — stored, unless it came from a hub id, which is then named instead."""
        text: TextEncoder | str = self.text_encoder_source or self.text_encoder
        if isinstance(text, str) and Path(text).is_dir():
            text = self.text_encoder  # a local folder is not portable: store it
        extra = self._saved_settings()
        if self.accel_presets:
            extra["accel_presets"] = self.accel_presets
        return save_infinity_native(path, self.transformer, self.vae, text, extra or None, transformer_dtype, overwrite)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> InfinityPipeline:
        """Move to ``device``. Infinity runs in float32 (``"auto"`` picks it): the official fp32 path, which the
        fixtures check, keeps float32 activations around bf16 cross-attention; bf16 weights are not supported yet."""
        if dtype == "auto":
            dtype = torch.float32
        if dtype is not None and dtype != torch.float32:
            raise InvalidInputError(
                f"Infinity models run in float32 for now (bf16 weights: not yet); got dtype {dtype}"
            )
        return super().to(device, dtype)

    def _place(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """The transformer, the tokenizer and the text encoder, all float32 (see ``to``)."""
        if device is not None:
            self.transformer.to(device)
            self.vae.to(device)
            self.text_encoder.encoder.to(device)
            self._variants.clear()  # transformed copies are remade where the model now is

    # ---- properties and settings ----------------------------------------------------------------------------
    @property
    def config(self) -> InfinityConfig:
        return self.transformer.cfg

    @property
    def num_classes(self) -> int:
        return 0  # prompts, not classes

    @property
    def image_size(self) -> int:
        """The longer side of the default image in pixels."""
        return max(self.schedule()[0].image_size)

    @property
    def token_stride(self) -> int:
        """Pixels per token side (16 for the releases)."""
        return self.vae.cfg.token_stride

    def schedule(self, size: Size | None = None, pn: str | None = None) -> tuple[InfinitySchedule, dict[str, Any]]:
        """The scale schedule for ``size`` (nearest aspect template; default: the model's, else square) at ``pn``
        (default: the model's), and what to report about the choice."""
        h_div_w, asked = parse_size(self.sampling_defaults["size"] if size is None else size)
        pn = self.sampling_defaults["pn"] if pn is None else pn
        if pn not in PN_SCALES:
            raise InvalidInputError(f"pn must be one of {', '.join(PN_SCALES)}, got {pn!r}")
        sched = schedule(h_div_w, pn, self.token_stride)
        h, w = sched.image_size
        info: dict[str, Any] = {"template": sched.template, "pn": pn, "scales": sched.num_scales, "size": [h, w]}
        if size is not None:
            info["requested"] = size if isinstance(size, str) else list(size)
            if asked is not None and asked != (h, w):
                log.info("size %s: the nearest template gives %dx%d (h x w) pixels at pn %s", size, h, w, pn)
        return sched, info

    def sizes(self, pn: str | None = None) -> list[str]:
        """Every image size this model samples at ``pn`` (default: the model's), as 'WIDTHxHEIGHT'."""
        return list(template_sizes(self.sampling_defaults["pn"] if pn is None else pn, self.token_stride))

    def sampling_params(
        self,
        cfg: float | Sequence[float] | None = None,
        tau: float | Sequence[float] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        rng: RngMode = "per_image",
        cfg_insertion_layer: int = 0,
    ) -> InfinityParams:
        """Settings for a call: the given values, else the model's recommended ones; a random seed if none."""
        d = self._settings(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return InfinityParams(**d, seed=self._seed(seed), rng=rng, cfg_insertion_layer=cfg_insertion_layer)

    def call_kwargs(self, params: InfinityParams) -> dict[str, Any]:  # type: ignore[override]
        kw = params.as_settings()
        kw.pop("trunk_scale", None)
        return kw

    def suggested_batch_size(self, kv_budget_mb: float = 1024.0, cap: int = 64) -> int:
        """Images at once whose self-attention KV caches (both guidance rows, the default schedule) fit in
        ``kv_budget_mb``, at most ``cap``."""
        seq_len = self.schedule()[0].seq_len
        per_image = 2 * self.transformer.kv_row_bytes(seq_len)
        return max(1, min(cap, int(kv_budget_mb * 2**20 // per_image)))

    def checked_settings(self, settings: dict[str, Any], batch: int) -> dict[str, Any]:
        s = settings
        params = self.sampling_params(s.get("cfg"), s.get("tau"), s.get("top_k"), s.get("top_p"), s.get("seed"))
        sched, _ = self.schedule(s.get("size"), s.get("pn"))
        self._check_params(params, sched)
        self.plan(s.get("accel"), sched)  # an unknown or impossible combination fails here, before any sampling
        return settings

    def _check_params(self, params: InfinityParams, sched: InfinitySchedule) -> None:
        check_request(self.transformer, self.vae, sched, params)

    # ---- sampling -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        cfg: float | Sequence[float] | None = None,
        tau: float | Sequence[float] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        size: Size | None = None,
        pn: str | None = None,
        seed: int | None = None,
        rng: RngMode = "per_image",
        output_type: OutputType = "pil",
        callback_on_scale: Callable[[InfinityScalePreview], None] | None = None,
        num_images_per_prompt: int = 1,
        cfg_insertion_layer: int = 0,
        first_image_index: int = 0,
        image_indices: Sequence[int] | None = None,
        sampler: Literal["fast", "reference"] = "fast",
        accel: AccelArg = None,
    ) -> InfinityOutput:
        """Generate ``num_images_per_prompt`` images per prompt.

        ``cfg``: Infinity's guidance (``cfg*cond + (1-cfg)*uncond``; 1 = unguided) and ``tau`` the temperature,
        each a number or one value per scale; ``top_k`` matters only as 1 (greedy bits), ``top_p`` (0.97) fixes a
        bit whose other value is at most 3% likely. ``negative_prompt``: replaces the learned null text of the
        unguided branch (one for all prompts, or one each). ``size``: (height, width) pixels, 'WIDTHxHEIGHT' or
        'W:H' -> the nearest aspect template (default: the model's size, else square), at ``pn`` pixels ("0.04M",
        "0.06M", "0.25M", "0.60M", "1M" at 16 px per token; default the model's); ``stats["schedule"]`` says what
        ran. ``cfg_insertion_layer=-k`` guides the hidden states after
        block depth-k instead of the logits. With ``rng="per_image"`` image i draws from a generator seeded by
        (seed, first_image_index + i); ``"official"`` draws the batch from one generator as the official code.
        ``accel``: acceleration plug-ins, as VAR's (spec strings, plug-in objects or a preset: ``"exact"``,
        ``"balanced"``, ``"fast"``): cfg-cutoff, skip-scales, scalekv, hack; ``stats`` reports what ran and its cost.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise InvalidInputError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        if num_images_per_prompt < 1:
            raise InvalidInputError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        if not prompts:
            raise InvalidInputError("need at least one prompt, got an empty list")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = self._negatives(negative_prompt, len(prompts), num_images_per_prompt)
        params = self.sampling_params(cfg, tau, top_k, top_p, seed, rng, cfg_insertion_layer)
        sched, sched_info = self.schedule(size, pn)
        self._check_params(params, sched)
        self._check_output_type(output_type)
        if sampler not in ("fast", "reference"):
            raise InvalidInputError(f"sampler must be 'fast' or 'reference' (the oracle loop), got {sampler!r}")
        plan = self.plan(accel, sched)
        if sampler == "reference" and plan is not None:
            raise InvalidInputError("sampler='reference' is the exact oracle loop; acceleration needs sampler='fast'")
        B = len(prompts)
        indices = self._image_indices(B, first_image_index, image_indices)
        # One encoder pass for the prompts and the negative prompts together (the features of a prompt do not
        # depend on its batch: the official code pads every prompt to 512 tokens).
        unique = list(dict.fromkeys(prompts + (negatives or [])))
        feats = self.text_encoder.encode(unique)
        rows = {p: i for i, p in enumerate(unique)}
        feats = TextFeatures(feats.kv_compact.to(self.device), feats.lens)
        text = feats.select([rows[p] for p in prompts])
        negative = None if negatives is None else feats.select([rows[p] for p in negatives])
        gens = params.generators(B, self.device, indices=indices)
        if sampler == "reference":
            on_scale = None
            if callback_on_scale is not None:

                def on_scale(step: ScaleStep) -> None:
                    preview = InfinityScalePreview(step.si, sched.num_scales, step.bits_Bhwd, step.summed_codes, self)
                    callback_on_scale(preview)

            res = reference_sample(self.transformer, self.vae, text, sched, params, gens, negative, on_scale)
            run_stats: dict[str, Any] = {}
            bits, summed = res.bits, res.summed_codes
        else:
            transformer = self.transformer_for(accel) if plan is not None else self.transformer
            bits, summed, run_stats = self._sample(
                transformer, text, negative, sched, params, gens, callback_on_scale, plan
            )
        if output_type == "latent":
            images: Any = summed.squeeze(-3)
        else:
            images = self._format_images(self.decode_latent(summed), output_type)
        stats = {"schedule": sched_info, "text_tokens": list(text.lens), **run_stats}
        if accel is not None:
            stats["resolved"] = self.describe_accel(accel, pn).as_dict()
        return InfinityOutput(images, bits, prompts, params.seed or 0, params, stats)

    def _sample(
        self,
        m: Infinity,
        text: TextFeatures,
        negative: TextFeatures | None,
        sched: InfinitySchedule,
        params: InfinityParams,
        gens: Any,
        callback_on_scale: Callable[[InfinityScalePreview], None] | None,
        plan: RequestPlan | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, Any]]:
        """The fast loop: the engine's per-scale step over a preallocated KV cache of this batch (compressed as the
        plan says, packed as the engine packs it), on the transformer ``m`` (the model or its int8 copy)."""
        rows = request_rows(params, sched, text.rows, plan)
        kv = own_cache(m, rows, sched, plan, _pool_len(sched.pn))
        gen = InfinityGeneration(m, self.vae, text, sched, params, gens, kv, negative, release=kv.free, plan=plan)
        try:
            while not gen.done:
                out = gen.step()
                if callback_on_scale is not None:
                    summed = out.summed_codes.clone()
                    callback_on_scale(InfinityScalePreview(out.si, gen.num_scales, out.bits_Bhwd, summed, self))
            assert gen.summed is not None
            return gen.bits, gen.summed, gen.stats()
        finally:
            gen.release()

    # ---- acceleration -----------------------------------------------------------------------------------------
    def plan_context(self, sched: InfinitySchedule) -> PlanContext:
        """What a method may know about this model on ``sched``: its scales' h x w grids, depth and heads."""
        from nextscale.accel import PlanContext

        m = self.transformer
        heights = tuple(h for h, _ in sched.grids)
        return PlanContext(heights, m.depth, None, m.cfg.num_heads, grids=sched.grids, family=self.family)

    def _methods(self, accel: AccelArg, sched: InfinitySchedule) -> list[Accel]:
        """The methods ``accel`` resolves to on ``sched`` (the model's presets, else Infinity's built-in ones), those
        that run here only."""
        from nextscale.accel import resolve

        methods = resolve(accel, self.plan_context(sched), self.accel_presets)
        for m in methods:
            if m.name == "code":
                raise InvalidInputError(
                    "code does not run on Infinity models (an Infinity model has no refiner); use cfg-cutoff, "
                    "skip-scales, fastvar, scalekv or hack"
                )
        return methods

    def transformer_for(self, accel: AccelArg) -> Infinity:
        """The transformer ``accel`` runs on: the model itself, or its transformed copy (int8 weights), made once."""
        from nextscale.accel.base import transform_key, transform_model

        methods = self._methods(accel, self.schedule()[0])
        key = transform_key(methods)
        return self.transformed(key, lambda m: transform_model(methods, m)) if key else self.transformer

    def transform_specs(self, accel: AccelArg) -> tuple[str, ...]:
        from nextscale.accel.base import transform_key

        return transform_key(self._methods(accel, self.schedule()[0]))

    def plan(self, accel: AccelArg, sched: InfinitySchedule | None = None) -> RequestPlan | None:
        """The per-scale plan of ``accel`` on ``sched`` (default: the square schedule at the model's pixel budget;
        None: exact), checked before any sampling."""
        from nextscale.accel import build_plan

        sched = sched or self.schedule()[0]
        methods = self._methods(accel, sched)
        return build_plan(methods, self.plan_context(sched)) if methods else None

    def describe_accel(self, accel: AccelArg, pn: str | None = None) -> Resolved:
        """What ``accel`` runs on this model: ``str()`` gives ``"fast -> cfg-cutoff:last=3, ... (built-in preset for
        infinity models)"`` (``nextscale.accel.describe``)."""
        from nextscale.accel import describe

        sched = self.schedule(None, pn)[0]
        self._methods(accel, sched)
        return describe(accel, self.plan_context(sched), self.accel_presets)

    def schedule_plans(self, accel: AccelArg) -> SchedulePlans | None:
        """``accel`` as the engine takes it: a plan for every schedule a request may have (None: exact)."""
        sched = self.schedule()[0]
        methods = self._methods(accel, sched)
        if not methods:
            return None
        from nextscale.accel import build_plan

        def make(s: InfinitySchedule) -> RequestPlan:
            return build_plan(methods, self.plan_context(s))

        make(sched)  # an impossible setting fails now, not at the first request
        return SchedulePlans(make, tuple(m.spec() for m in methods))

    @staticmethod
    def _negatives(negative: str | Sequence[str] | None, count: int, per_prompt: int) -> list[str] | None:
        if negative is None:
            return None
        items = [negative] if isinstance(negative, str) else list(negative)
        if len(items) == 1:
            return items * count
        if len(items) * per_prompt == count:
            return [p for p in items for _ in range(per_prompt)]
        raise InvalidInputError(
            f"negative_prompt must be one string or one per prompt ({count // per_prompt}), got {len(items)}"
        )

    # ---- tokenizer helpers ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_latent(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Summed codes [B, d, 1, H, W] or [B, d, H, W] -> images [B, 3, H*16, W*16] in [0, 1] (float32)."""
        z = summed_codes.squeeze(-3) if summed_codes.ndim == 5 else summed_codes
        return self.vae.decode(z.to(self.device).float()).add(1).mul_(0.5).clamp_(0, 1)

    def _format(self, images_BChw: torch.Tensor, output_type: OutputType) -> Any:
        self._check_output_type(output_type)
        if output_type == "latent":
            raise InvalidInputError("a preview is an image: output_type must be 'pil', 'np' or 'pt'")
        return self._format_images(images_BChw, output_type)

    @classmethod
    def describe_model(cls, path: Path, text_encoder: str | None = None) -> dict[str, Any]:
        """What ``nextscale info`` shows of an Infinity folder or official file: format, family, each part's
        parameter count and configuration (the released model type when the shape is one)."""
        from nextscale.models.infinity_weights import (
            infer_bsq_config,
            infer_infinity_config,
            looks_like_infinity,
            read_bsq_state_dict,
            read_infinity_state_dict,
        )

        def part(model: torch.nn.Module, cfg: Any, **extra: Any) -> dict[str, Any]:
            from nextscale.config import _to_dict

            return {"params": count_params(model), "config": _to_dict(cfg), **extra}

        if path.is_dir() and (path / "model_index.json").is_file():
            transformer, vae, source, index = load_infinity_native(path)
            info = {
                "format": "native",
                "family": cls.family,
                "path": str(path),
                "transformer": part(transformer, transformer.cfg, model_type=transformer.cfg.release_name()),
                "vae": part(vae, vae.cfg),
                "text_encoder": source,
            }
            return {**info, **{k: index[k] for k in ("sampling_defaults",) if k in index}}
        sd = read_infinity_state_dict(path)
        with torch.device("meta"):  # counted on a meta-device model: the same number as for the converted folder
            if looks_like_infinity(sd):
                cfg = infer_infinity_config(sd, str(path))
                kind, body = "transformer", part(Infinity(cfg), cfg, model_type=cfg.release_name())
            else:
                bsq_sd = read_bsq_state_dict(path)
                vae_cfg = infer_bsq_config(bsq_sd, str(path))
                kind, body = "vae", part(BSQVAE(vae_cfg), vae_cfg)
        return {"format": "official", "family": cls.family, "path": str(path), kind: {**body, "tensors": len(sd)}}

    def engine_family(self, accel: AccelArg = None) -> InfinityFamily:
        """This model as the serving engine runs it (``Engine(pipe.engine_family())``): requests of any template at
        the model's pixel budget. ``accel``: the server's default (checked here; the plans themselves come with each
        request: ``quality_plans``)."""
        from nextscale.engine.infinity.family import InfinityFamily

        self.schedule_plans(accel)
        served = self.transformer_for(accel)
        if served is not self.transformer:
            log.info("serving a transformed model for every quality level (%s)", accel)
        return InfinityFamily(served, self.vae, self.text_encoder, self.sampling_defaults)

    def quality_plans(self, levels: Mapping[str, AccelArg]) -> dict[str, QualityPlan]:
        """The plans of each level (``{"auto": serve --accel, "high": "exact", ...}``: one per schedule, as the
        engine admits them) and what each runs. One engine runs one transformer: a level whose method changes the
        model (int8) must be the server's ``auto`` too."""
        from nextscale.engine.family import QualityPlan

        server_wide = self.server_wide_methods(levels)
        out = {}
        for q, name in levels.items():
            plans = self.schedule_plans(name)
            names = plans.names if plans else ()
            out[q] = QualityPlan(plans, (*(n for n in server_wide if n not in names), *names))
        return out

    def __repr__(self) -> str:
        c = self.transformer.cfg
        return (
            f"InfinityPipeline(depth={c.depth}, width={c.embed_dim}, heads={c.num_heads}, bits={c.bits}, "
            f"text={c.text_channels}, pn={self.sampling_defaults['pn']}, device={self.device}, dtype={self.dtype})"
        )
