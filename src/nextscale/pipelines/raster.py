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

The tokenizer is anything that implements ``RasterTokenizer``: the official LlamaGen ``VQModel``
(``LlamaGenVQTokenizer``) or nextscale's own VQ-VAE with a single scale (``MSVQTokenizer``: a plain VQ-VAE, as
the trainer makes them). ``make_tokenizer`` wraps either module after checking it against the GPT.
"""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from nextscale.engine.raster.sampler import (
    RasterParams,
    RasterResult,
    RasterStep,
    StepCallback,
    reference_sample_raster,
    sample_raster,
)
from nextscale.engine.raster.speculative import SpeculativePlan, sample_speculative
from nextscale.engine.var.params import RngMode
from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.hardware import auto_dtype
from nextscale.images import to_pil
from nextscale.labels import resolve_labels
from nextscale.models.llamagen import LlamaGen, LlamaGenConfig
from nextscale.models.llamagen_weights import load_llamagen_gpt, load_llamagen_vq
from nextscale.models.native import check_raster_pair, load_raster_native, resolve_model_dir, save_raster_native
from nextscale.models.tokenizers.msvq import VQVAE, to_unit_range_
from nextscale.models.tokenizers.vq import VQModel
from nextscale.pipelines.var import bundled_model_dir

if TYPE_CHECKING:
    from nextscale.accel import Resolved

log = logging.getLogger(__name__)
OutputType = Literal["pil", "np", "pt", "latent"]
ClassLabels = int | str | Sequence[int | str] | torch.Tensor
# sample_c2i.py's defaults; a model folder may store its own (model_index.json "sampling_defaults").
DEFAULT_SAMPLING: dict[str, Any] = {"cfg": 4.0, "cfg_interval": -1.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0}
RowCallback = Callable[[int, Any], None]


# ---- tokenizers ------------------------------------------------------------------------------------------------
class RasterTokenizer(ABC):
    """What a raster pipeline needs of its tokenizer: token grid <-> images, in raster (row, column) order.

    ``kind`` is the module's class name as stored in a model folder (``vae/config.json``). Images are float
    [B, C, H, W] in [-1, 1]; code maps float32 [B, D, grid, grid]. The module stays float32 whatever the GPT's
    dtype (``sample_c2i.py`` keeps its VQ in float32 too)."""

    kind: str
    module: nn.Module
    vocab_size: int
    grid: int
    downsample: int
    channels: int

    @property
    def image_size(self) -> int:
        return self.grid * self.downsample

    @abstractmethod
    def embed(self, idx_BL: torch.Tensor) -> torch.Tensor:
        """Tokens [B, grid²] -> code map [B, D, grid, grid] (float32)."""

    @abstractmethod
    def mean_code(self) -> torch.Tensor:
        """The mean code vector [D]: a neutral fill for positions not sampled yet (row previews)."""

    @abstractmethod
    def codebook(self) -> torch.Tensor:
        """The code vectors [V, D] as the quantizer looks them up (latent proximity for LANTERN / GSD)."""

    @abstractmethod
    def decode_codes(self, codes_BDgg: torch.Tensor) -> torch.Tensor:
        """Code map -> images [B, C, H, W], float32, clamped to [-1, 1]."""

    @abstractmethod
    def encode(self, images_BChw: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> tokens [B, grid²] (e.g. to extract training codes)."""

    def decode_tokens(self, idx_BL: torch.Tensor) -> torch.Tensor:
        """Tokens [B, grid²] -> images [B, C, H, W] in [-1, 1]."""
        if idx_BL.ndim != 2 or idx_BL.shape[1] != self.grid**2:
            raise InvalidInputError(
                f"expected tokens [B, {self.grid**2}] ({self.grid}x{self.grid} grid), got {tuple(idx_BL.shape)}"
            )
        return self.decode_codes(self.embed(idx_BL))


class LlamaGenVQTokenizer(RasterTokenizer):
    """The official LlamaGen ``VQModel`` (l2-normalised codebook). It is fully convolutional: the grid comes from
    the GPT it serves."""

    kind = "VQModel"

    def __init__(self, vq: VQModel, grid: int):
        self.vq = self.module = vq
        self.grid, self.vocab_size = grid, vq.cfg.codebook_size
        self.downsample, self.channels = vq.cfg.downsample, vq.cfg.out_channels

    def embed(self, idx_BL: torch.Tensor) -> torch.Tensor:
        return self.vq.quantize.lookup(idx_BL, self.grid, self.grid).float()

    def mean_code(self) -> torch.Tensor:
        return self.vq.quantize.codebook().float().mean(0)

    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.codebook().float()

    def decode_codes(self, codes_BDgg: torch.Tensor) -> torch.Tensor:
        w = self.vq.post_quant_conv.weight
        return self.vq.decode_latent(codes_BDgg.to(w.dtype)).float().clamp_(-1, 1)

    def encode(self, images_BChw: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(images_BChw.to(self.vq.quant_conv.weight.dtype))


class MSVQTokenizer(RasterTokenizer):
    """nextscale's ``VQVAE`` with one scale, ``patch_nums=(grid,)``: a plain VQ-VAE. Its single Phi conv is part of
    the decoder path (code map -> Phi -> decoder), exactly as ``VQVAE.idx_to_img`` with one token map."""

    kind = "VQVAE"

    def __init__(self, vae: VQVAE):
        c = vae.cfg
        if len(c.patch_nums) != 1:
            raise CheckpointError(
                f"a multi-scale VQ-VAE (patch_nums {c.patch_nums}) cannot tokenize for a raster model; it "
                f"needs a single scale, e.g. patch_nums=({c.latent_size},)"
            )
        self.vae = self.module = vae
        self.vocab_size, self.grid, self.downsample, self.channels = (
            c.vocab_size,
            c.latent_size,
            c.downsample,
            c.in_channels,
        )

    def embed(self, idx_BL: torch.Tensor) -> torch.Tensor:
        return self.vae.quantize.embed_map(idx_BL).float()

    def mean_code(self) -> torch.Tensor:
        return self.vae.quantize.embedding.weight.float().mean(0)

    def codebook(self) -> torch.Tensor:
        return self.vae.quantize.embedding.weight.float()

    def decode_codes(self, codes_BDgg: torch.Tensor) -> torch.Tensor:
        return self.vae.fhat_to_img(self.vae.quantize.embed_to_fhat([codes_BDgg])[-1])

    def encode(self, images_BChw: torch.Tensor) -> torch.Tensor:
        return self.vae.img_to_idx(images_BChw.to(self.vae.quant_conv.weight.dtype))[0]


def make_tokenizer(module: nn.Module | RasterTokenizer, gpt_cfg: LlamaGenConfig, source: str = "") -> RasterTokenizer:
    """Wrap a tokenizer module (``VQModel`` or single-scale ``VQVAE``) for a GPT, or check a ready
    ``RasterTokenizer``: codebook size, grid and downsampling must match the GPT (one-line ``CheckpointError``)."""
    if not isinstance(module, RasterTokenizer):
        check_raster_pair(gpt_cfg, module, source)  # VQModel or single-scale VQVAE, else a one-line error
        if isinstance(module, VQModel):
            return LlamaGenVQTokenizer(module, gpt_cfg.grid_size)
        assert isinstance(module, VQVAE)
        return MSVQTokenizer(module)
    have = (module.vocab_size, module.grid, module.downsample)
    want = (gpt_cfg.vocab_size, gpt_cfg.grid_size, gpt_cfg.downsample)
    if have != want:
        raise CheckpointError(
            f"{source + ': ' if source else ''}the tokenizer (codebook, grid, downsample) is {have}, the GPT "
            f"needs {want}"
        )
    return module


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
        tok = self.pipe.tokenizer
        codes = tok.embed(self.tokens_BL)
        codes[:, :, rows:, :] = tok.mean_code().to(codes.device)[None, :, None, None]
        return _format(to_unit_range_(tok.decode_codes(codes)), self.output_type)


def _format(images_BChw: torch.Tensor, output_type: OutputType) -> Any:
    """Images in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return images_BChw
    if output_type == "np":
        return images_BChw.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    return to_pil(images_BChw)


# ---- the pipeline ----------------------------------------------------------------------------------------------
class LlamaGenPipeline:
    family = "raster"

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
        unknown = set(sampling_defaults or {}) - set(DEFAULT_SAMPLING)
        if unknown:
            raise InvalidInputError(f"unknown sampling_defaults {sorted(unknown)}; allowed: {sorted(DEFAULT_SAMPLING)}")
        # The model's recommended settings (stored in model_index.json), used when a call leaves them unset.
        self.sampling_defaults = {**DEFAULT_SAMPLING, **(sampling_defaults or {})}
        self.sampling_params(seed=0)  # a bad stored value fails here, not at the first call
        # Speculative presets tuned for this model ("balanced", "fast" -> a spec; model_index.json), which take
        # precedence over nextscale.accel.speculative.PRESETS. Checked here, not at the first call.
        self.speculative_presets = dict(speculative_presets or {})
        for name, spec in self.speculative_presets.items():
            if not isinstance(spec, str) or ":" in name:
                raise InvalidInputError(f"speculative preset {name!r} must map a plain name to a spec string")
            self.speculative_config(spec)
        self.class_names: tuple[str, ...] = ()
        if class_names:
            self.set_class_names(class_names)
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
        bundled = bundled_model_dir(str(name_or_path))
        if not Path(name_or_path).exists() and bundled.is_dir():
            folder = bundled
        else:
            folder = resolve_model_dir(name_or_path, revision, local_files_only, cache_dir)
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
        custom = {k: v for k, v in self.sampling_defaults.items() if DEFAULT_SAMPLING.get(k) != v}
        extra: dict[str, Any] = {"sampling_defaults": custom} if custom else {}
        if self.class_names:
            extra["class_names"] = list(self.class_names)
        if self.speculative_presets:
            extra["speculative_presets"] = dict(self.speculative_presets)
        vae = self.tokenizer.module
        if not isinstance(vae, (VQModel, VQVAE)):
            raise InvalidInputError(f"cannot save a {type(vae).__name__} tokenizer; allowed: VQModel, VQVAE")
        return save_raster_native(path, self.transformer, vae, extra or None, transformer_dtype, overwrite)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> LlamaGenPipeline:
        """Move to ``device``; ``dtype`` applies to the GPT (the tokenizer stays float32, as in ``sample_c2i.py``).
        ``dtype="auto"``: bf16 where it is native, float32 elsewhere (``hardware.auto_dtype``)."""
        if device is not None:
            self.device = torch.device(device)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                log.warning("CUDA requested but not available in this torch build or machine; using the CPU")
                self.device = torch.device("cpu")
            self.transformer.to(self.device)
            self.vae.to(self.device)
        if dtype == "auto":
            dtype = auto_dtype(self.device)
        if dtype is not None:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise InvalidInputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
            self.dtype = dtype
            self.transformer.to(dtype=dtype)
        return self

    def set_class_names(self, names: Sequence[str]) -> None:
        """Name the classes (e.g. ImageNet's for an official checkpoint); checked against ``num_classes``."""
        names = tuple(str(n) for n in names)
        if len(names) != self.num_classes:
            raise InvalidInputError(f"{len(names)} class names given for a model of {self.num_classes} classes")
        self.class_names = names

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def config(self) -> LlamaGenConfig:
        return self.transformer.cfg

    @property
    def num_classes(self) -> int:
        return self.transformer.cfg.num_classes

    @property
    def image_size(self) -> int:
        return self.transformer.cfg.image_size

    @property
    def grid_size(self) -> int:
        return self.transformer.cfg.grid_size

    @property
    def seq_len(self) -> int:
        return self.transformer.cfg.seq_len

    def suggested_batch_size(self, kv_budget_mb: float = 1024.0, cap: int = 64) -> int:
        """Images to sample at once: as many as keep one batch's KV cache (both guidance rows, every layer, every
        position) within ``kv_budget_mb``, at most ``cap``."""
        c = self.transformer.cfg
        per_image = (
            2 * 2 * c.n_layer * c.seq_len * c.kv_heads * c.head_dim * self.transformer.output.weight.element_size()
        )
        return max(1, min(cap, int(kv_budget_mb * 2**20 // per_image)))

    def labels(self, class_labels: ClassLabels, num_images_per_label: int = 1) -> torch.Tensor:
        return resolve_labels(class_labels, self.num_classes, self.class_names, num_images_per_label).to(self.device)

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
        d = self.sampling_defaults
        return RasterParams(
            cfg_scale=d["cfg"] if cfg is None else cfg,
            cfg_interval=d["cfg_interval"] if cfg_interval is None else cfg_interval,
            temperature=d["temperature"] if temperature is None else temperature,
            top_k=d["top_k"] if top_k is None else top_k,
            top_p=d["top_p"] if top_p is None else top_p,
            seed=secrets.randbits(63) if seed is None else seed,
            rng=rng,
        )

    def speculative_config(self, speculative: Any) -> Any:
        """Parse a speculative-decoding spec (a string such as those of ``nextscale.accel.speculative``, a preset
        name — this model's ``speculative_presets`` first —, or a config object) before any sampling; the result has
        ``.window`` and ``.rule(model)``."""
        if isinstance(speculative, str) and speculative.strip().lower() in self.speculative_presets:
            speculative = self.speculative_presets[speculative.strip().lower()]
        try:
            from nextscale.accel.speculative import parse_speculative
        except ModuleNotFoundError as e:
            if e.name != "nextscale.accel.speculative":
                raise
            raise InvalidInputError(
                "speculative decoding is not available in this nextscale build (nextscale.accel.speculative is missing)"
            ) from e
        return parse_speculative(speculative)

    def describe_accel(self, speculative: Any) -> Resolved:
        """What a speculative setting runs on this model (``VARPipeline.describe_accel``'s raster counterpart):
        ``str()`` gives ``"fast -> gsd:dist=6.0 (model's tuned preset)"``; ``None`` is plain decoding
        (``nextscale.accel.speculative.describe``)."""
        if speculative is None:
            from nextscale.accel.base import DEFAULT, Resolved

            return Resolved("exact", (), DEFAULT)
        self.speculative_config(speculative)  # its one-line errors (a missing module included)
        from nextscale.accel.speculative import describe

        return describe(speculative, self.speculative_presets)

    def speculative_plan(self, speculative: Any) -> SpeculativePlan:
        """The engine's ``SpeculativePlan`` for a spec: its rule for this model — latent proximity (LANTERN) measured
        between the tokenizer's code vectors, as LANTERN does — and its window."""
        return self._plan(self.speculative_config(speculative))

    def _plan(self, spec: Any) -> SpeculativePlan:
        return SpeculativePlan(spec.rule(self.transformer, self.tokenizer.codebook()), spec.window)

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
        if image_indices is None:
            indices = list(range(first_image_index, first_image_index + B))
        else:
            indices = [int(g) for g in image_indices]
            if len(indices) != B:
                raise InvalidInputError(f"image_indices has {len(indices)} entries for {B} images")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InvalidInputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
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
        images = None if output_type == "latent" else _format(self.decode_images(tokens), output_type)
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
            return sample_speculative(self.transformer, labels_B, params, plan.rule, plan.window, gens, on_step)
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
        return _format(self.decode_images(tokens_BL.to(self.device)), output_type)

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
