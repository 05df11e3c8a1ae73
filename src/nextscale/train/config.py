"""Frozen configurations of the training jobs (tokenizer; VAR or LlamaGen transformer), validated at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from nextscale.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


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

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "steps", "log_every", "eval_every", "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema decay must be in [0, 1), got {self.ema}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0 < self.progress_every_s < math.inf:
            raise ConfigError(f"progress_every_s must be a number of seconds > 0, got {self.progress_every_s}")

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

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        if self.image_size != self.patch_nums[-1] * 2 ** (len(self.ch_mult) - 1):
            raise ConfigError(
                f"image_size {self.image_size} != patch_nums[-1] * 2**(len(ch_mult)-1) = "
                f"{self.patch_nums[-1]} * {2 ** (len(self.ch_mult) - 1)}"
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
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.loss_from_scale < 0:
            raise ConfigError(f"loss_from_scale must be >= 0, got {self.loss_from_scale}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")


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
        if not self.tokenizer:
            raise ConfigError(
                "tokenizer is required: a single-scale VQ-VAE folder (`nextscale train-vae --patch-nums 16 ...`)"
            )
        for name in ("depth", "embed_dim", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ConfigError(
                f"the head dim embed_dim / num_heads = {self.embed_dim // self.num_heads} must be a multiple of 4 "
                "(2-D RoPE gives a quarter of it to rows, a quarter to columns)"
            )
        kv = self.num_kv_heads
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.num_heads % kv):
            raise ConfigError(f"num_kv_heads must be an int >= 1 dividing num_heads {self.num_heads}, got {kv!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError(f"cond_drop must be in [0, 1), got {self.cond_drop}")


# `nextscale train --arch NAME`: the transformer families the trainer builds.
ARCHS: dict[str, type[LoopConfig]] = {"var": VARTrainConfig, "llamagen": LlamaGenTrainConfig}


def train_config_class(arch: str) -> type[LoopConfig]:
    """The config class of ``--arch`` (one-line ``ConfigError`` for an unknown name)."""
    if arch not in ARCHS:
        raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS[arch]
