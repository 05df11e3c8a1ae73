"""Frozen configurations of the training jobs (tokenizer; VAR or LlamaGen transformer), validated at construction.

Every setting is checked when a config is built (``__post_init__``, with the shared validators of
``nextscale.config``), so a bad value is refused in one line before a dataset is read or a file is written. The
allowed range of every numeric setting is declared once, in ``INTS``/``FLOATS``/``INT_LISTS``: the configs check
it, and ``nextscale train``'s flags parse with it. What needs the tokenizer or the data (its scales, its classes)
is checked by the task before it tokenizes anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from nextscale.config import (
    VARConfig,
    VQVAEConfig,
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_int,
    check_text,
)
from nextscale.errors import ConfigError

if TYPE_CHECKING:
    from nextscale.models.llamagen import LlamaGenConfig

PRECISIONS = ("fp32", "bf16", "fp16")
MAX_COUNT = 2**31 - 1  # steps, batch sizes, intervals: far beyond any run, and exact as a float (warm-up rounding)
MAX_SEED = 2**63 - 1  # the CLI's seed bound; the task generators add small offsets, within torch's 64-bit seeds
MAX_LR = 1.0  # an AdamW step moves each weight by about lr: beyond 1 no run converges
GREY_DATASETS = ("fashion-mnist", "mnist5k", "fashion-pairs")  # built-in 1-channel sets; folders are read as RGB


class Interval(NamedTuple):
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False


FRACTION = Interval(0.0, 1.0, hi_open=True)  # a rate or share: 1 would drop, smooth or average away everything
WEIGHT = Interval(0.0, 1e6)  # a loss weight or clipping norm (0 = off)

# The allowed values of every numeric setting of every training config (a name means the same in each class).
# Bounds are what a run can honour, not what a typical run uses.
INTS: dict[str, tuple[int, int]] = {
    "batch_size": (1, MAX_COUNT),
    "grad_accum": (1, MAX_COUNT),
    "steps": (1, MAX_COUNT),
    "log_every": (1, MAX_COUNT),
    "eval_every": (1, MAX_COUNT),
    "ckpt_every": (1, MAX_COUNT),
    "stop_after": (1, MAX_COUNT),
    "seed": (0, MAX_SEED),
    "image_size": (1, 16_384),
    "vocab_size": (2, 2**24),
    "z_channels": (1, 65_536),
    "ch": (1, 65_536),
    "num_res_blocks": (0, 256),
    "share_quant_resi": (0, 4096),  # 0: one residual conv per scale
    "dead_code_every": (0, MAX_COUNT),  # 0 = never
    "depth": (1, 4096),
    "embed_dim": (1, 2**20),
    "num_heads": (1, 65_536),
    "num_kv_heads": (1, 65_536),
    "pg0": (0, 4096),
    "loss_from_scale": (0, 4096),
    "bits": (1, 64),
    "base_ch": (1, 65_536),
    "patch_size": (4, 16),
    "text_channels": (128, 65_536),
    "block_chunks": (1, 4096),
}
FLOATS: dict[str, Interval] = {
    "lr": Interval(0.0, MAX_LR, lo_open=True),
    "weight_decay": Interval(0.0, 100.0),
    "weight_decay_end": Interval(0.0, 100.0),
    "warmup": FRACTION,  # of the steps
    "wp0": Interval(0.0, 1.0),  # factors of the peak learning rate at the first and the last step
    "wpe": Interval(0.0, 1.0),
    "grad_clip": WEIGHT,
    "ema": FRACTION,
    "progress_every_s": Interval(0.0, 7 * 86_400.0, lo_open=True),
    "l1_weight": WEIGHT,
    "vq_weight": WEIGHT,
    "beta": WEIGHT,
    "mlp_ratio": Interval(0.0, 256.0, lo_open=True),
    "drop_path_rate": FRACTION,
    "init_adaln_gamma": WEIGHT,
    "cond_drop": FRACTION,
    "label_smoothing": FRACTION,
    "progressive": Interval(0.0, 1.0),  # share of the steps over which scales are added; 0 = off
    "entropy_weight": WEIGHT,
    "bsc_strength": Interval(0.0, 1.0, hi_open=True),  # Bitwise Self-Correction: the largest bit-flip rate
}
INT_LISTS: dict[str, tuple[int, int]] = {"patch_nums": (1, 1024), "ch_mult": (1, 64)}


def _check_numbers(cfg: Any) -> None:
    """Every numeric setting of ``cfg`` against its declared range (an optional one may be None); tuples of ints
    become tuples (lists come from JSON), so the config stays hashable."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and f.default is None:
            continue
        if f.name in INTS:
            check_int(f.name, value, *INTS[f.name])
        elif f.name in FLOATS:
            i = FLOATS[f.name]
            check_float(f.name, value, i.lo, i.hi, lo_open=i.lo_open, hi_open=i.hi_open)
        elif f.name in INT_LISTS:
            lo, hi = INT_LISTS[f.name]
            ok = isinstance(value, (list, tuple)) and value
            if not ok or any(isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi for v in value):
                raise ConfigError(
                    f"{f.name} must be a non-empty list of ints in {lo}..{hi} (on the command line: 1,2,4), "
                    f"got {value!r}"
                )
            object.__setattr__(cfg, f.name, tuple(value))


@dataclass(frozen=True)
class LoopConfig:
    """What every training job shares: optimisation schedule, precision, I/O cadence, resumption."""

    data: str = "fashion-mnist"
    out_dir: str = "runs/default"
    data_root: str | None = None
    batch_size: int = 128  # global, over all ranks and accumulation steps
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    warmup: float = 0.02  # fraction of the steps (the official recipe warms up for ep/50 epochs)
    wp0: float = 0.005
    wpe: float = 0.01
    grad_clip: float = 2.0
    precision: str = "fp32"
    ema: float = 0.0  # EMA decay of the exported weights; 0 = export the raw weights
    seed: int = 0
    device: str = "cpu"
    hflip: bool = False
    log_every: int = 20
    eval_every: int = 500
    ckpt_every: int = 200
    resume: bool = False
    resume_from: str | None = None  # a training checkpoint to continue from (e.g. checkpoints/prev.pt)
    stop_after: int | None = None  # end this run after so many steps (time-boxed sessions, tests)
    progress: bool = True
    progress_every_s: float = 30.0  # without a terminal: a progress line this often (and at each 10 % of steps)
    compile: bool = False  # torch.compile the trained module (fuses the memory-bound elementwise work)
    export_name: ClassVar[str] = "model"  # the folder under out_dir the end of training writes

    def __post_init__(self) -> None:
        _check_numbers(self)  # every class's numeric settings, before the checks that combine them
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool):
                check_bool(f.name, getattr(self, f.name))
        check_text("data", self.data, "a built-in dataset name (fashion-mnist, mnist5k) or an image folder")
        check_text("out_dir", self.out_dir, "a folder path")
        if self.data_root is not None:
            check_text("data_root", self.data_root, "a folder path")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        check_choice("precision", self.precision, PRECISIONS)
        check_device("device", self.device)
        if self.resume_from is not None:
            check_text("resume_from", self.resume_from, "a training checkpoint file")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps)

    @property
    def wd_end(self) -> float:
        return self.weight_decay if self.weight_decay_end is None else self.weight_decay_end

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class VAETrainConfig(LoopConfig):
    """Multi-scale residual VQ-VAE from scratch. Defaults: the 32 px Fashion-MNIST demo tokenizer."""

    image_size: int = 32
    vocab_size: int = 512
    z_channels: int = 16
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    using_sa: bool = False
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    share_quant_resi: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    l1_weight: float = 0.5
    vq_weight: float = 1.0
    beta: float = 0.25
    dead_code_every: int = 50  # re-seed codes unused for this many steps (0 = never)
    # Start from the weights of a tokenizer of this job's shape (a tokenizer or model folder, or an official
    # vae_*.pth): a longer run, or one on new images, without starting over.
    init_from: str | None = None
    export_name: ClassVar[str] = "tokenizer"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.vqvae_config()  # the tokenizer's own shape rules (increasing scales, GroupNorm widths)
        if self.init_from is not None:
            check_text("init_from", self.init_from, "a tokenizer folder, a model folder or an official vae_*.pth")
        if self.image_size != self.patch_nums[-1] * 2 ** (len(self.ch_mult) - 1):
            raise ConfigError(
                f"image_size {self.image_size} != patch_nums[-1] * 2**(len(ch_mult)-1) = "
                f"{self.patch_nums[-1]} * {2 ** (len(self.ch_mult) - 1)}"
            )

    @property
    def in_channels(self) -> int:
        """Channels of the images the tokenizer is trained on: 1 for the grey built-in sets, else 3 (RGB)."""
        return 1 if self.data in GREY_DATASETS else 3

    def vqvae_config(self) -> VQVAEConfig:
        """The VQ-VAE this job trains."""
        return VQVAEConfig(
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            in_channels=self.in_channels,
            using_sa=self.using_sa,
            using_mid_sa=self.using_sa,
            beta=self.beta,
            share_quant_resi=self.share_quant_resi,
            patch_nums=self.patch_nums,
        )


@dataclass(frozen=True)
class BSQTrainConfig(LoopConfig):
    """Infinity's bitwise tokenizer (``BSQVAE``: multi-scale binary spherical quantization) from scratch
    (``train-vae --arch bsq``). Defaults: the text-to-image demo's, on ``fashion-pairs`` (32 x 64 canvases, 4 px per
    token, the 6 grids of Infinity's "0.04M" schedules)."""

    data: str = "fashion-pairs"
    image_size: int = 64  # the crop side (fashion-pairs: the canvas width; its height is half)
    bits: int = 16
    base_ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    patch_size: int = 4
    pn: str = "0.04M"  # the scale schedule trained (of the images' aspect template)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    l1_weight: float = 0.5
    beta: float = 0.25  # commitment
    entropy_weight: float = 0.1
    export_name: ClassVar[str] = "tokenizer"

    def __post_init__(self) -> None:
        super().__post_init__()
        from nextscale.config import PN_SCALES

        check_choice("pn", self.pn, tuple(PN_SCALES))
        self.bsq_config()  # the tokenizer's own shape rules (patch sizes, GroupNorm widths)

    @property
    def in_channels(self) -> int:
        """1 for the grey built-in sets (fashion-pairs, fashion-mnist, mnist5k), else 3."""
        return 1 if self.data in GREY_DATASETS else 3

    def bsq_config(self) -> Any:
        """The ``BSQVAEConfig`` this job trains."""
        from nextscale.models.tokenizers.bsq import BSQVAEConfig

        return BSQVAEConfig(
            bits=self.bits,
            base_ch=self.base_ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            spatial_patchify=False,
        )


@dataclass(frozen=True)
class VARTrainConfig(LoopConfig):
    """The VAR transformer on a frozen tokenizer (the official recipe). Defaults: the demo model."""

    tokenizer: str = ""  # folder written by train-vae, or a model folder whose VQ-VAE is reused
    init_from: str | None = None  # fine-tune from a native model folder or an official var_d*.pth
    depth: int = 6
    embed_dim: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    attn_l2_norm: bool = True
    shared_aln: bool = False
    drop_path_rate: float = 0.0
    init_adaln_gamma: float = 1e-3
    cond_drop: float = 0.1
    label_smoothing: float = 0.0
    progressive: float = 0.0  # official --pg: fraction of training over which scales are added (0 = off)
    pg0: int = 2
    # Train only on the tokens of scales >= this one (the earlier scales still condition them): a CoDe refiner,
    # which only ever generates the last scales, spends its capacity there.
    loss_from_scale: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokenizer:
            raise ConfigError("tokenizer is required: the folder written by `nextscale train-vae`")
        check_text("tokenizer", self.tokenizer, "the folder written by `nextscale train-vae`")
        if self.init_from is not None:
            check_text("init_from", self.init_from, "a native model folder or an official var_d*.pth")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if round(self.embed_dim * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives an MLP of no units at embed_dim {self.embed_dim}")

    def var_config(self, tokenizer: VQVAEConfig, class_names: tuple[str, ...]) -> VARConfig:
        """The transformer this job trains on ``tokenizer`` for ``class_names`` (``init_from`` keeps the shape of
        the pretrained model instead), checked against the tokenizer's scales."""
        scales = len(tokenizer.patch_nums)
        if scales == 1:
            raise ConfigError(
                f"tokenizer {self.tokenizer} has a single scale (patch_nums {tokenizer.patch_nums}): a raster "
                "tokenizer; VAR needs a multi-scale one (train it with --arch llamagen instead)"
            )
        if self.loss_from_scale >= scales:
            raise ConfigError(f"loss_from_scale={self.loss_from_scale}: the model has scales 0..{scales - 1}")
        if self.progressive > 0 and self.pg0 >= scales:
            raise ConfigError(f"pg0={self.pg0}: progressive training starts within the scales 0..{scales - 1}")
        return VARConfig(
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            num_classes=len(class_names),
            vocab_size=tokenizer.vocab_size,
            z_channels=tokenizer.z_channels,
            patch_nums=tokenizer.patch_nums,
            shared_aln=self.shared_aln,
            attn_l2_norm=self.attn_l2_norm,
            drop_path_rate=self.drop_path_rate,
            cond_drop_rate=self.cond_drop,
            class_names=class_names,
        )


@dataclass(frozen=True)
class LlamaGenTrainConfig(LoopConfig):
    """A LlamaGen c2i GPT (raster order, next token) on a frozen single-scale tokenizer (``--arch llamagen``).

    The recipe of LlamaGen's ``train_c2i.py``: AdamW betas (0.9, 0.95), lr 1e-4, weight decay 0.05, gradient
    clipping at 1.0, class dropout 0.1. The loop's warm-up and linear decay apply on top (``train_c2i.py`` keeps
    the learning rate constant); ``--warmup 0 --wpe 1`` gives a constant one after a single step. Width, depth and
    heads reuse the VAR flags' names: ``--embed-dim`` is the GPT's ``dim``, ``--depth`` its ``n_layer``.
    """

    tokenizer: str = ""  # a single-scale VQ-VAE: `nextscale train-vae --patch-nums 16 ...`, or a raster model folder
    depth: int = 8
    embed_dim: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention (None: as many as query heads, the c2i releases)
    cond_drop: float = 0.1  # train_c2i.py --class-dropout-prob
    grad_clip: float = 1.0  # train_c2i.py --max-grad-norm

    def __post_init__(self) -> None:
        super().__post_init__()
        wanted = "a single-scale VQ-VAE folder (`nextscale train-vae --patch-nums 16 ...`)"
        if not self.tokenizer:
            raise ConfigError(f"tokenizer is required: {wanted}")
        check_text("tokenizer", self.tokenizer, wanted)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ConfigError(
                f"the head dim embed_dim / num_heads = {self.embed_dim // self.num_heads} must be a multiple of 4 "
                "(2-D RoPE gives a quarter of it to rows, a quarter to columns)"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_kv_heads must be an int >= 1 dividing num_heads {self.num_heads}, got {self.num_kv_heads!r}"
            )

    def gpt_config(self, tokenizer: VQVAEConfig, num_classes: int) -> LlamaGenConfig:
        """The GPT this job trains on ``tokenizer`` (single-scale: its grid is read in raster order)."""
        from nextscale.models.llamagen import LlamaGenConfig  # here: the model module imports torch

        if len(tokenizer.patch_nums) != 1:
            raise ConfigError(
                f"tokenizer {self.tokenizer} has patch_nums {tokenizer.patch_nums}; --arch llamagen needs a "
                f"single-scale VQ-VAE (e.g. `nextscale train-vae --patch-nums {tokenizer.latent_size} ...`)"
            )
        return LlamaGenConfig(
            dim=self.embed_dim,
            n_layer=self.depth,
            n_head=self.num_heads,
            n_kv_head=self.num_kv_heads,
            vocab_size=tokenizer.vocab_size,
            num_classes=num_classes,
            image_size=tokenizer.image_size,
            downsample=tokenizer.downsample,
        )


@dataclass(frozen=True)
class InfinityTrainConfig(LoopConfig):
    """An Infinity text-to-image transformer on a frozen bitwise tokenizer and a frozen T5 text encoder
    (``train --arch infinity``), from captioned images (``fashion-pairs`` or a folder with ``metadata.jsonl``).
    Infinity's objective: a binary cross-entropy per bit of every token of every scale, on Bitwise Self-Correction
    inputs (``bsc_strength``: each scale's bits flipped at a rate drawn from 0..strength per step), with
    ``cond_drop`` of the captions replaced by the learned null text (``cfg_uncond``) for guidance. Defaults: the
    text-to-image demo's."""

    data: str = "fashion-pairs"
    tokenizer: str = ""  # a folder written by `train-vae --arch bsq`, or an Infinity model folder
    text_encoder: str = ""  # a T5 folder (config.json + weights, its tokenizer beside or inside) or hub id
    # Fine-tune from an Infinity model folder or an official transformer file (infinity_*.pth, a shard folder):
    # its architecture replaces depth/width/heads; its bits and text width must be this run's tokenizer's/encoder's.
    init_from: str | None = None
    image_size: int = 64  # the crop side (fashion-pairs: the canvas width; its height is half)
    pn: str = "0.04M"
    depth: int = 6
    embed_dim: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    block_chunks: int = 1
    drop_path_rate: float = 0.0
    cond_drop: float = 0.1
    bsc_strength: float = 0.3  # the official --noise_apply_strength
    batch_size: int = 64
    lr: float = 1e-3
    warmup: float = 0.03
    grad_clip: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        from nextscale.config import PN_SCALES

        for name, what in (
            ("tokenizer", "the folder written by `nextscale train-vae --arch bsq`"),
            ("text_encoder", "a T5 encoder folder or hub id"),
        ):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required: {what}")
            check_text(name, getattr(self, name), what)
        if self.init_from is not None:
            check_text("init_from", self.init_from, "an Infinity model folder or an official transformer file")
        check_choice("pn", self.pn, tuple(PN_SCALES))
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    def infinity_config(self, token_bits: int, text_channels: int) -> Any:
        """The ``InfinityConfig`` this job trains for a tokenizer of ``token_bits`` and an encoder of
        ``text_channels`` (its own shape rules checked)."""
        from nextscale.models.infinity import InfinityConfig

        return InfinityConfig(
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            text_channels=text_channels,
            bits=token_bits,
            block_chunks=self.block_chunks,
            mlp_ratio=self.mlp_ratio,
            drop_path_rate=self.drop_path_rate,
        )


# `nextscale train --arch NAME`: the transformer families the trainer builds.
ARCHS: dict[str, type[LoopConfig]] = {
    "var": VARTrainConfig,
    "llamagen": LlamaGenTrainConfig,
    "infinity": InfinityTrainConfig,
}
# `nextscale train-vae --arch NAME`: the tokenizers (multi-scale VQ for VAR and LlamaGen; bitwise for Infinity).
VAE_ARCHS: dict[str, type[LoopConfig]] = {"msvq": VAETrainConfig, "bsq": BSQTrainConfig}


def train_config_class(arch: str, archs: dict[str, type[LoopConfig]] | None = None) -> type[LoopConfig]:
    """The config class of ``--arch`` among ``archs`` (default: the transformers; one-line ``ConfigError`` for an
    unknown name)."""
    archs = ARCHS if archs is None else archs
    if arch not in archs:
        raise ConfigError(f"arch must be one of {', '.join(archs)}, got {arch!r}")
    return archs[arch]
