"""Frozen configuration objects for the two models, and named presets of the official release.

Configs are built once at the edge (CLI, checkpoint loader, tests) and validated in ``__post_init__``;
library code receives them and never reads argv or globals. ``to_dict``/``from_dict`` give the
``config.json`` stored next to native weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from nextscale.errors import ConfigError

# Infinity's pixel budgets (at 16 px per token) -> token grids per schedule (``models.infinity_scales``); "0.04M"
# (192 x 192 square) is nextscale's, for small models. Here, without torch, so the CLI's flags can list them.
PN_SCALES = {"0.04M": 6, "0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

# Guidance weights above this only saturate the softmax (at 1e308 the logits overflow to inf/nan): the one bound
# that the sampling parameters of both families, the HTTP API and the CLI enforce.
MAX_CFG = 100.0

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _check_patch_nums(patch_nums: tuple[int, ...], min_scales: int = 2) -> None:
    if len(patch_nums) < min_scales:
        raise ConfigError(f"patch_nums needs at least {min_scales} scales, got {patch_nums}")
    if any(not isinstance(p, int) or p < 1 for p in patch_nums):
        raise ConfigError(f"patch_nums must be positive ints, got {patch_nums}")
    if any(a >= b for a, b in itertools.pairwise(patch_nums)):
        raise ConfigError(f"patch_nums must be strictly increasing, got {patch_nums}")


# Validators of single settings, shared by every config class: each returns the value or raises a one-line
# ConfigError naming the setting, what is allowed and what was given.


def check_ch_mult(model: str, ch: int, name: str, mult: tuple[int, ...], groups: int) -> None:
    """A conv tokenizer's channel multipliers: non-empty, positive, and every width ``ch * m`` a multiple of the
    GroupNorm ``groups``."""
    if not mult or any(m < 1 for m in mult):
        raise ConfigError(f"{name} must be a non-empty tuple of positive ints, got {mult}")
    for width in {ch * m for m in mult}:
        if width % groups:
            raise ConfigError(
                f"every {model} width must be a multiple of {groups} (GroupNorm groups); "
                f"ch={ch} with {name}={mult} gives {width}"
            )


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if lo == -math.inf and hi == math.inf:
        return ""
    if hi == math.inf:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo == -math.inf:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_int(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    """An int in ``[lo, hi]`` (``hi=None``: no upper bound); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} must be an int {allowed}, got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A finite number in the interval (``lo_open``/``hi_open`` exclude the bound); NaN and infinities never pass."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        allowed = _interval(lo, hi, lo_open, hi_open)
        raise ConfigError(f"{name} must be a finite number{' ' + allowed if allowed else ''}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A rate or share in [0, 1): 1 would drop, smooth or decay everything."""
    return check_float(name, value, 0.0, 1.0, hi_open=True)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_text(name: str, value: Any, what: str = "a non-empty string") -> str:
    """A non-empty string (``what`` says what it names, e.g. "a folder path")."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return value


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")  # where nextscale runs (whether one is present is checked later)


def check_device(name: str, value: Any) -> str:
    """A torch device string of a type nextscale runs on (whether one is present is checked where it is used)."""
    wanted = f"a device such as cpu, cuda or cuda:1 (types: {', '.join(DEVICE_TYPES)})"
    check_text(name, value, wanted)
    import torch  # here, not at import: config stays importable without torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{name} must be {wanted}, got {value!r}") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class VQVAEConfig:
    """The multi-scale residual VQ-VAE (``VQVAE`` of the official code).

    ``ch_mult`` sets both the channel widths and the number of down-sampling stages
    (``len(ch_mult) - 1``); the latent side is ``patch_nums[-1]``, the image side
    ``patch_nums[-1] * 2 ** (len(ch_mult) - 1)``.
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    dropout: float = 0.0
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    quant_conv_ks: int = 3
    using_znorm: bool = False
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        # One scale is a plain VQ-VAE: the tokenizer of raster-order (LlamaGen-style) models.
        _check_patch_nums(self.patch_nums, min_scales=1)
        if self.vocab_size < 2 or self.z_channels < 1:
            raise ConfigError(f"vocab_size must be >= 2 and z_channels >= 1, got {self.vocab_size}, {self.z_channels}")
        check_ch_mult("VQ-VAE", self.ch, "ch_mult", self.ch_mult, self.norm_groups)
        if self.share_quant_resi < 0:
            raise ConfigError(f"share_quant_resi must be >= 0, got {self.share_quant_resi}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 (grey) or 3 (RGB), got {self.in_channels}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQVAEConfig:
        return _from_dict(cls, d)


@dataclass(frozen=True)
class VARConfig:
    """The VAR transformer. Defaults are those of ``build_vae_var(depth=16)`` (head dim 64)."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        _check_patch_nums(self.patch_nums)
        if self.depth < 1 or self.num_heads < 1 or self.embed_dim < 1:
            raise ConfigError(
                f"depth, num_heads and embed_dim must be >= 1, got {self.depth}, {self.num_heads}, {self.embed_dim}"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"{len(self.class_names)} class_names given for num_classes={self.num_classes}")
        if not 0.0 <= self.cond_drop_rate < 1.0:
            raise ConfigError(f"cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def null_class(self) -> int:
        """Row of ``class_emb`` used for the unconditional branch of classifier-free guidance."""
        return self.num_classes

    @classmethod
    def official(cls, depth: int, shared_aln: bool | None = None, **overrides: Any) -> VARConfig:
        """The shape ``build_vae_var`` gives: width 64*depth, heads = depth, 512 px schedule for d36."""
        if shared_aln is None:
            shared_aln = depth == 36
        patch_nums = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
        base: dict[str, Any] = dict(
            depth=depth,
            embed_dim=64 * depth,
            num_heads=depth,
            shared_aln=shared_aln,
            patch_nums=patch_nums,
            drop_path_rate=0.1 * depth / 24,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VARConfig:
        return _from_dict(cls, d)


PRESETS: dict[str, VARConfig] = {f"var-d{d}": VARConfig.official(d) for d in (16, 20, 24, 30, 36)}


def preset(name: str) -> VARConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _from_dict(cls: Any, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"_class_name", "_nextscale_version"})
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    for k, v in kwargs.items():
        if isinstance(v, float) and math.isnan(v):
            raise ConfigError(f"{cls.__name__}.{k} is NaN")
    return cls(**kwargs)
