"""``LlamaGenPipeline``: class labels -> images with a raster-order (next-token) model, LlamaGen c2i.

    pipe = LlamaGenPipeline.from_official("c2i_B_256.pt", "vq_ds16_c2i.pt")
    out = pipe([207, 360], cfg=4.0, top_k=2000, seed=0)
    out.images[0].save("dog.png")

The raster counterpart of ``VARPipeline``, with the same construction (``from_official``, ``from_pretrained``,
``save_pretrained``, ``to``), labels (indices or names) and RNG contract: with ``rng="per_image"`` image i depends
only on (seed, i, its label, the settings), never on its batch. One call = one batch through
``engine.raster.sample_raster`` (``sampler="reference"``: the official loop), or through the speculative loop
(``speculative=``). Settings follow LlamaGen's ``sample_c2i.py``: ``cfg`` is its ``cfg_scale``
(``uncond + (cond - uncond) * cfg``, unguided at ``cfg <= 1``), defaults cfg 4.0, top-k 2000, top-p 1.0 (off),
temperature 1.0, no cfg_interval.

The tokenizer is anything that implements ``models.tokenizers.raster.RasterTokenizer`` (the official LlamaGen
``VQModel`` or nextscale's own single-scale VQ-VAE, wrapped by ``make_tokenizer``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from nextscale.engine.params import RngMode
from nextscale.engine.raster.params import RasterParams
from nextscale.engine.raster.sampler import (
    RasterResult,
    RasterStep,
    StepCallback,
    reference_sample_raster,
    sample_raster,
)
from nextscale.engine.raster.speculative import SpeculativePlan, sample_speculative
from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.models.llamagen import LlamaGen, LlamaGenConfig
from nextscale.models.llamagen_weights import load_llamagen_gpt, load_llamagen_vq
from nextscale.models.native_raster import load_raster_native, save_raster_native
from nextscale.models.tokenizers import to_unit_range_
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.tokenizers.raster import LlamaGenVQTokenizer, MSVQTokenizer, RasterTokenizer, make_tokenizer
from nextscale.models.tokenizers.vq import VQModel
from nextscale.pipelines.base import ClassLabels, OutputType, Pipeline, count_params

if TYPE_CHECKING:
    from nextscale.accel import Resolved
    from nextscale.engine.family import QualityPlan
    from nextscale.engine.raster.family import RasterFamily

# sample_c2i.py's defaults; a model folder may store its own (model_index.json "sampling_defaults").
DEFAULT_SAMPLING: dict[str, Any] = {"cfg": 4.0, "cfg_interval": -1.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0}
RowCallback = Callable[[int, Any], None]

log = logging.getLogger(__name__)


# ---- outputs ---------------------------------------------------------------------------------------------------
@dataclass
class LlamaGenOutput:
    """``images``: PIL list, float [B, H, W, C] array in [0, 1] (``np``), [B, C, H, W] tensor in [0, 1] (``pt``),
    or None (``latent``: nothing is decoded). ``tokens``: LongTensor [B, L] in raster order.
    ``stats``: ``forward_passes`` (transformer calls per image, mean), ``row_tokens``, ``guided_steps``, with
    ``speculative`` what that loop reports (``mean_accepted``, ...), and ``resolved``: what ``speculative`` asked for
    and ran (``describe_accel(speculative).as_dict()``)."""

    images: Any
    tokens: torch.Tensor
    labels: list[int]
    seed: int
    params: RasterParams
    stats: dict[str, Any] = field(default_factory=dict)


class _RowPreviews:
    """Collects the tokens of a call step by step and calls ``callback(rows_done, preview)`` each time
    ``every`` more rows of the grid are complete (and at the last row)."""

    def __init__(self, pipe: LlamaGenPipeline, B: int, callback: RowCallback, every: int, output_type: OutputType):
        g = pipe.grid_size
        self.pipe, self.callback, self.every, self.output_type, self.grid = pipe, callback, every, output_type, g
        self.tokens_BL = torch.zeros(B, g * g, dtype=torch.long, device=pipe.device)
        self.rows_done = 0

    def on_step(self, step: RasterStep) -> None:
        self.tokens_BL[:, step.t] = step.idx_B
        if (step.t + 1) % self.grid:
            return
        self.rows_done = (step.t + 1) // self.grid
        if self.rows_done % self.every == 0 or self.rows_done == self.grid:
            self.callback(self.rows_done, self.preview(self.rows_done))

    def preview(self, rows: int) -> Any:
        if self.output_type == "latent":
            return self.tokens_BL[:, : rows * self.grid].clone()
        images = to_unit_range_(self.pipe.tokenizer.decode_rows(self.tokens_BL, rows))
        return self.pipe._format_images(images, self.output_type)


# ---- the pipeline ----------------------------------------------------------------------------------------------
class LlamaGenPipeline(Pipeline):
    # The family's registration facts (``pipelines.registry``; see ``VARPipeline``).
    family = "raster"
    family_title = "raster (LlamaGen)"
    official_options = ("image_size", "n_head")
    official_files = "c2i_*.pt + vq_ds16_c2i.pt"
    sampling_options = ("cfg_interval", "temperature", "speculative", "sampler")
    accel_option = "speculative"
    default_sampling = DEFAULT_SAMPLING
    transformer: LlamaGen

    @classmethod
    def claims_file(cls, path: str | Path) -> int:
        """2 for a readable LlamaGen GPT or VQ tokenizer file (by names only its files have), else 0."""
        import warnings

        from nextscale.models.llamagen_weights import is_llamagen_state_dict, read_llamagen_state_dict

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return 2 if is_llamagen_state_dict(read_llamagen_state_dict(path)) else 0
        except (CheckpointError, OSError):
            return 0

    def __init__(
        self,
        transformer: LlamaGen,
        vae: VQModel | VQVAE | RasterTokenizer,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        sampling_defaults: dict[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        speculative_presets: dict[str, str] | None = None,
    ):
        self.transformer = transformer.eval().requires_grad_(False)
        self.tokenizer = make_tokenizer(vae, transformer.cfg)
        self.vae = self.tokenizer.module.eval().requires_grad_(False)
        self._init_settings(sampling_defaults, class_names or ())
        # Speculative presets tuned for this model ("balanced", "fast" -> a spec; model_index.json), which take
        # precedence over nextscale.accel.speculative.PRESETS. Checked here, not at the first call.
        self.speculative_presets = dict(speculative_presets or {})
        for name, spec in self.speculative_presets.items():
            if not isinstance(spec, str) or ":" in name:
                raise InvalidInputError(f"speculative preset {name!r} must map a plain name to a spec string")
            self.speculative_config(spec)
        self.to(device, dtype)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_official(
        cls,
        gpt_path: str | Path,
        vq_path: str | Path,
        image_size: int | None = None,
        n_head: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        class_names: Sequence[str] | None = None,
    ) -> LlamaGenPipeline:
        """Load the official ``c2i_*.pt`` GPT and ``vq_ds16_c2i.pt`` files as they are. ``image_size`` defaults to
        the GPT file name's ``_256``/``_384`` suffix (else 256), ``n_head`` to the release's heads for that width
        (else head dim 64): neither is in any tensor shape."""
        gpt, _ = load_llamagen_gpt(gpt_path, n_head=n_head, image_size=image_size)
        vq, _ = load_llamagen_vq(vq_path)
        tokenizer = make_tokenizer(vq, gpt.cfg, f"{gpt_path} with {vq_path}")
        return cls(gpt, tokenizer, device, dtype, class_names=class_names)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        revision: str | None = None,
        local_files_only: bool = False,
        cache_dir: str | Path | None = None,
    ) -> LlamaGenPipeline:
        """A native raster model folder, a bundled model's name (``demo-fmnist-raster``) or a Hugging Face hub repo
        id (downloaded once into the HF cache)."""
        folder = cls._model_folder(name_or_path, revision, local_files_only, cache_dir)
        gpt, vae, index = load_raster_native(folder)
        names = index.get("class_names")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"{folder / 'model_index.json'}: class_names must be a list of strings")
        tokenizer = make_tokenizer(vae, gpt.cfg, str(folder))
        return cls(
            gpt,
            tokenizer,
            device,
            dtype,
            sampling_defaults=index.get("sampling_defaults"),
            class_names=names,
            speculative_presets=index.get("speculative_presets"),
        )

    def save_pretrained(
        self, path: str | Path, transformer_dtype: torch.dtype | None = None, overwrite: bool = False
    ) -> Path:
        """Write a native folder (``model_index.json`` + ``transformer/`` + ``vae/``) that ``from_pretrained``
        loads with no arguments; non-default sampling settings and class names go into ``model_index.json``.

        An earlier model folder at ``path`` is replaced atomically; a file or a folder with other files in it is
        refused, or with ``overwrite=True`` moved aside to ``<name>.old`` (kept, never deleted)."""
        extra = self._saved_settings()
        if self.class_names:
            extra["class_names"] = list(self.class_names)
        if self.speculative_presets:
            extra["speculative_presets"] = dict(self.speculative_presets)
        vae = self.tokenizer.module
        if not isinstance(vae, (VQModel, VQVAE)):
            raise InvalidInputError(f"cannot save a {type(vae).__name__} tokenizer; allowed: VQModel, VQVAE")
        return save_raster_native(path, self.transformer, vae, extra or None, transformer_dtype, overwrite)

    def _place(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """``dtype`` applies to the GPT; the tokenizer stays float32, as in ``sample_c2i.py``."""
        if device is not None:
            self.transformer.to(device)
            self.vae.to(device)
        if dtype is not None:
            self.transformer.to(dtype=dtype)

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def config(self) -> LlamaGenConfig:
        return self.transformer.cfg

    @property
    def image_size(self) -> int:
        return self.transformer.cfg.image_size

    @property
    def grid_size(self) -> int:
        return self.transformer.cfg.grid_size

    @property
    def seq_len(self) -> int:
        return self.transformer.cfg.seq_len

    def sampling_params(
        self,
        cfg: float | None = None,
        cfg_interval: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        rng: RngMode = "per_image",
    ) -> RasterParams:
        """Settings for a call: the given values, else the model's recommended ones; a random seed if none."""
        d = self._settings(cfg=cfg, cfg_interval=cfg_interval, top_k=top_k, top_p=top_p, temperature=temperature)
        return RasterParams.from_settings(d, self._seed(seed), rng)

    @classmethod
    def describe_model(cls, path: Path, n_head: int | None = None, image_size: int | None = None) -> dict[str, Any]:
        """What ``nextscale info`` shows of a raster model folder or official file: format, family, each part's
        parameter count and configuration (and a folder's stored defaults and class names)."""
        from nextscale.models.llamagen_weights import (
            image_size_from_name,
            infer_llamagen_config,
            infer_vq_config,
            read_llamagen_state_dict,
        )

        if path.is_dir():
            gpt, vae, index = load_raster_native(path)
            info: dict[str, Any] = {
                "format": "native",
                "family": cls.family,
                "path": str(path),
                "transformer": {"params": count_params(gpt), "config": gpt.cfg.to_dict()},
                "vae": {"params": count_params(vae), "kind": type(vae).__name__, "config": vae.cfg.to_dict()},
            }
            return {**info, **{k: index[k] for k in ("sampling_defaults", "class_names") if k in index}}
        sd = read_llamagen_state_dict(path)
        part: dict[str, Any]
        with torch.device("meta"):  # counted on a meta-device model: the same number as for the converted folder
            if "tok_embeddings.weight" in sd:
                cfg = infer_llamagen_config(sd, n_head, image_size or image_size_from_name(path), str(path))
                kind, part = "transformer", {"params": count_params(LlamaGen(cfg)), "config": cfg.to_dict()}
            else:
                vq_cfg = infer_vq_config(sd, source=str(path))
                params = count_params(VQModel(vq_cfg))
                kind, part = "vae", {"params": params, "kind": "VQModel", "config": vq_cfg.to_dict()}
        return {"format": "official", "family": cls.family, "path": str(path), kind: {**part, "tensors": len(sd)}}

    def checked_settings(self, settings: dict[str, Any], batch: int) -> dict[str, Any]:
        s = settings
        self.sampling_params(s.get("cfg"), s.get("cfg_interval"), s.get("top_k"), s.get("top_p"), s.get("temperature"))
        speculative = s.get("speculative")
        if speculative is not None:
            window = self.speculative_config(speculative).window
            if batch > 1 and self.device.type == "cpu":
                # A pass verifies `window` guesses of every image: at batch > 1 a CPU is compute-bound and the fewer
                # passes no longer pay (benchmarks/RESULTS.md, "Speculative decoding ... batch size").
                log.info(
                    "speculative decoding at batch %d on a CPU: each pass verifies %d guesses per image, so past "
                    "batch 1 it is slower than exact (bundled raster demo: 1.6x faster at batch 1, 0.84x at 4, 0.52x "
                    "at 40); it pays for one image's latency (batch size 1), not for throughput",
                    batch,
                    window,
                )
        return settings

    def speculative_config(self, speculative: Any) -> Any:
        """Parse a speculative-decoding spec (a string such as those of ``nextscale.accel.speculative``, a preset
        name — this model's ``speculative_presets`` first —, or a config object) before any sampling; the result has
        ``.window``, ``.zipar`` (0: raster order) and ``.rule(model)``."""
        if isinstance(speculative, str) and speculative.strip().lower() in self.speculative_presets:
            speculative = self.speculative_presets[speculative.strip().lower()]
        from nextscale.accel.speculative import parse_speculative

        return parse_speculative(speculative)

    def describe_accel(self, speculative: Any) -> Resolved:
        """What a speculative setting runs on this model (``VARPipeline.describe_accel``'s raster counterpart):
        ``str()`` gives ``"fast -> gsd:dist=6.0 (model's tuned preset)"``; ``None`` is plain decoding
        (``nextscale.accel.speculative.describe``)."""
        if speculative is None:
            from nextscale.accel.base import DEFAULT, Resolved

            return Resolved("exact", (), DEFAULT)
        self.speculative_config(speculative)  # its one-line errors
        from nextscale.accel.speculative import describe

        return describe(speculative, self.speculative_presets)

    def speculative_plan(self, speculative: Any) -> SpeculativePlan:
        """The engine's ``SpeculativePlan`` for a spec: its rule for this model — latent proximity (LANTERN) measured
        between the tokenizer's code vectors, as LANTERN does — and its window."""
        return self._plan(self.speculative_config(speculative))

    def _plan(self, spec: Any) -> SpeculativePlan:
        return SpeculativePlan(spec.rule(self.transformer, self.tokenizer.codebook()), spec.window, spec.zipar)

    # ---- serving ------------------------------------------------------------------------------------------------
    def engine_family(self, speculative: Any = None) -> RasterFamily:
        """This model as the serving engine runs it (every request's plan is its own: ``speculative`` changes no
        weights, so it is accepted for the same call as ``VARPipeline.engine_family`` and only checked)."""
        from nextscale.engine.raster.family import RasterFamily

        self.describe_accel(speculative)
        return RasterFamily(self.transformer, self.tokenizer, self.class_names, self.sampling_defaults)

    def quality_plans(self, levels: Mapping[str, Any]) -> dict[str, QualityPlan]:
        """The speculative plan of each level (``{"auto": serve --speculative, "high": "exact", ...}``; None or
        "exact" decode token by token) and the spec that rebuilds it, defaults left out ("sjd", "gsd:dist=6")."""
        from nextscale.engine.family import QualityPlan

        out = {}
        for q, name in levels.items():
            if name in (None, "exact"):
                out[q] = QualityPlan(None)
            else:
                out[q] = QualityPlan(self.speculative_plan(name), (self.speculative_config(name).spec(),))
        return out

    # ---- sampling -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        class_labels: ClassLabels,
        cfg: float | None = None,
        cfg_interval: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        rng: RngMode = "per_image",
        output_type: OutputType = "pil",
        speculative: Any = None,
        callback_on_rows: RowCallback | None = None,
        callback_every: int = 1,
        num_images_per_label: int = 1,
        sampler: Literal["fast", "reference"] = "fast",
        first_image_index: int = 0,
        image_indices: Sequence[int] | None = None,
    ) -> LlamaGenOutput:
        """Generate one image per label (times ``num_images_per_label``).

        ``cfg`` is LlamaGen's ``cfg_scale``; ``cfg_interval > -1`` stops guidance after that many decode steps;
        ``top_k=0`` / ``top_p=1.0`` turn those filters off. Unset settings take the model's recommended values
        (``sample_c2i.py``'s: cfg 4.0, top-k 2000, top-p 1.0, temperature 1.0). With ``rng="per_image"`` image i
        draws from a generator seeded by (seed, first_image_index + i) — or (seed, image_indices[i]).

        ``speculative``: a spec (string or config object) for ``nextscale.accel.speculative``; the window of guessed
        tokens is verified in one forward pass, and ``stats`` reports ``forward_passes`` and ``mean_accepted``.

        ``callback_on_rows(rows_done, preview)`` is called after every ``callback_every`` completed rows of the
        token grid (and after the last). ``preview`` is in ``output_type``: the images decoded from the rows so
        far, every position not sampled yet filled with the tokenizer's mean code vector (a flat, neutral
        region; one decoder pass per preview), or, for ``"latent"``, the tokens of the completed rows [B, rows*grid].
        """
        labels_B = self.labels(class_labels, num_images_per_label)
        params = self.sampling_params(cfg, cfg_interval, top_k, top_p, temperature, seed, rng)
        B = labels_B.shape[0]
        indices = self._image_indices(B, first_image_index, image_indices)
        self._check_output_type(output_type)
        if sampler not in ("fast", "reference"):
            raise InvalidInputError(f"sampler must be 'fast' or 'reference', got {sampler!r}")
        if isinstance(callback_every, bool) or not isinstance(callback_every, int) or callback_every < 1:
            raise InvalidInputError(f"callback_every must be an int >= 1 (rows), got {callback_every!r}")
        spec = None
        if speculative is not None:
            if sampler == "reference":
                raise InvalidInputError("sampler='reference' is the exact official loop; speculative needs 'fast'")
            spec = self.speculative_config(speculative)
        gens = params.generators(B, self.device, indices=indices)
        rows = (
            None if callback_on_rows is None else _RowPreviews(self, B, callback_on_rows, callback_every, output_type)
        )
        on_step: StepCallback | None = None if rows is None else rows.on_step
        res = self._sample(labels_B, params, gens, on_step, sampler, spec)
        tokens = res.tokens_BL
        images = None if output_type == "latent" else self._format_images(self.decode_images(tokens), output_type)
        stats = dict(res.stats)
        if spec is not None:
            stats["speculative"] = spec.spec() if hasattr(spec, "spec") else str(speculative)
        stats["resolved"] = self.describe_accel(speculative).as_dict()
        return LlamaGenOutput(images, tokens, labels_B.tolist(), params.seed or 0, params, stats)

    def _sample(
        self,
        labels_B: torch.Tensor,
        params: RasterParams,
        gens: Any,
        on_step: StepCallback | None,
        sampler: str,
        spec: Any,
    ) -> RasterResult:
        if spec is not None:
            plan = self._plan(spec)
            return sample_speculative(
                self.transformer, labels_B, params, plan.rule, plan.window, gens, on_step, plan.zipar
            )
        loop = reference_sample_raster if sampler == "reference" else sample_raster
        return loop(self.transformer, labels_B, params, gens, on_step)

    # ---- tokenizer helpers ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images_BChw: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> tokens [B, L] in raster order."""
        return self.tokenizer.encode(images_BChw.to(self.device))

    @torch.inference_mode()
    def decode_tokens(self, tokens_BL: torch.Tensor, output_type: OutputType = "pil") -> Any:
        """Tokens [B, L] -> images in ``output_type`` (``"latent"`` is not a decoding: use the tokens)."""
        if output_type == "latent":
            raise InvalidInputError("decode_tokens returns images: output_type must be 'pil', 'np' or 'pt'")
        return self._format_images(self.decode_images(tokens_BL.to(self.device)), output_type)

    def decode_images(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Tokens -> images [B, C, H, W] in [0, 1] (float32)."""
        return to_unit_range_(self.tokenizer.decode_tokens(tokens_BL))

    def __repr__(self) -> str:
        c = self.transformer.cfg
        return (
            f"LlamaGenPipeline(dim={c.dim}, n_layer={c.n_layer}, n_head={c.n_head}, grid={c.grid_size}, "
            f"vocab={c.vocab_size}, tokenizer={self.tokenizer.kind}, device={self.device}, dtype={self.dtype})"
        )


__all__ = [
    "DEFAULT_SAMPLING",
    "LlamaGenOutput",
    "LlamaGenPipeline",
    "LlamaGenVQTokenizer",
    "MSVQTokenizer",
    "RasterTokenizer",
    "make_tokenizer",
]
