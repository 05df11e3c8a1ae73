"""``nextscale train-vae`` and ``nextscale train``: flags are generated from the frozen training configs, so the
CLI cannot drift from the library (every ``VARTrainConfig`` and ``LlamaGenTrainConfig`` field is a ``--flag``).

``train --arch var`` (the default) trains VAR on a multi-scale tokenizer, ``train --arch llamagen`` a raster-order
LlamaGen GPT on a single-scale one (``train-vae --patch-nums 16 ...``); a flag of the other architecture is a
one-line error. ``--export`` writes the model of a run's newest checkpoint without training.
Single process by default; under ``torchrun --nproc_per_node=N`` the same commands run DDP. Each flag parses with
the range its config field declares (``train.config.INTS``/``FLOATS``), so a bad value is one line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from dataclasses import dataclass
from typing import Any

from nextscale.cli.args import DEVICE, FILE, Float, Int
from nextscale.errors import ConfigError

log = logging.getLogger("nextscale")

HELP = {
    "data": "fashion-mnist, mnist5k, or an image folder (one sub-folder per class)",
    "out_dir": "run folder: checkpoints/, metrics.jsonl, the exported model",
    "tokenizer": "folder written by `nextscale train-vae` (or a model folder / official vae .pth)",
    "init_from": "start from these weights: var, a native model folder or an official var_d*.pth; infinity, an "
    "Infinity model folder or an official transformer file of this tokenizer's bits and this encoder's width; msvq, "
    "a tokenizer of this run's shape (tokenizer or model folder, or an official vae .pth)",
    "steps": "optimizer steps in total",
    "batch_size": "global batch size (all ranks x accumulation)",
    "resume": "continue from out_dir/checkpoints/last.pt (prev.pt if killed while writing it) if it exists",
    "resume_from": "continue from this training checkpoint, e.g. out_dir/checkpoints/prev.pt when last.pt is bad",
    "progress": "show progress: a bar on a terminal, else log lines (step, loss, images/s, ETA)",
    "progress_every_s": "seconds between progress log lines (also one at each 10%% of the steps)",
    "stop_after": "end this invocation after N steps (resume later)",
    "precision": "fp32, bf16 or fp16 autocast",
    "ema": "EMA decay of the exported weights (0 = off)",
    "loss_from_scale": "train on the tokens of this scale and later ones only (a CoDe refiner: the last scales)",
    "patch_nums": "token map sides, coarse to fine; ONE value (e.g. 16) makes a plain VQ-VAE for --arch llamagen",
    "depth": "transformer blocks (llamagen: n_layer)",
    "embed_dim": "transformer width (llamagen: dim)",
    "num_heads": "attention heads (llamagen: head dim embed_dim/num_heads must be a multiple of 4)",
    "num_kv_heads": "key/value heads (grouped-query attention; default: num_heads)",
    "cond_drop": "share of labels replaced by the null class (classifier-free guidance)",
}
ARCH_NAMES = {
    "VARTrainConfig": "var",
    "LlamaGenTrainConfig": "llamagen",
    "InfinityTrainConfig": "infinity",
    "VAETrainConfig": "msvq",
    "BSQTrainConfig": "bsq",
}


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def add_config_args(p: argparse.ArgumentParser, *classes: type) -> None:
    """One ``--flag`` per field of the config classes (their union: a field several share is one flag)."""
    seen: dict[str, list[type]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            seen.setdefault(f.name, []).append(cls)
    for name, owners in seen.items():
        cls = owners[0]
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        t = _field_type(cls, f)
        flag = "--" + name.replace("_", "-")
        help_ = HELP.get(name, "") + _defaults_help(name, owners, classes)
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            metavar = "A,B,..." if typing.get_origin(t) is tuple else None
            p.add_argument(flag, type=flag_type(name, t), default=None, metavar=metavar, help=help_)


@dataclass(frozen=True)
class IntList(Int):
    """Comma-separated integers, each in ``[lo, hi]`` (``--patch-nums 1,2,4,8``)."""

    def wanted(self) -> str:
        return f"comma-separated integers in {self.lo}..{self.hi} like 1,2,4"

    def __call__(self, text: str) -> tuple[int, ...]:  # type: ignore[override]
        try:
            return tuple(super(IntList, self).__call__(x) for x in text.split(","))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected {self.wanted()}, got {text!r}") from None


def flag_type(name: str, t: Any) -> Any:
    """The parser of a setting's flag: numbers with the range the config class declares (so a bad value is refused
    naming its flag, as every other command's are), the device and checkpoint by what they name, text as it is."""
    from nextscale.train.config import FLOATS, INT_LISTS, INTS

    if name in INTS:
        return Int(*INTS[name])
    if name in FLOATS:
        i = FLOATS[name]
        return Float(i.lo, i.hi, i.lo_open)  # an open upper end (a rate < 1) is the config's to refuse
    if name in INT_LISTS:
        return IntList(*INT_LISTS[name])
    if name == "device":
        return DEVICE
    if name == "resume_from":
        return FILE
    if t is not str:
        raise TypeError(f"the setting {name} ({t}) has no declared range in nextscale.train.config")
    return str


def _defaults_help(name: str, owners: list[type], classes: tuple[type, ...]) -> str:
    defaults = {}
    for cls in owners:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        default = f.default if f.default is not dataclasses.MISSING else None
        defaults[ARCH_NAMES.get(cls.__name__, cls.__name__)] = default
    only = f" ({'/'.join(defaults)} only)" if len(owners) < len(classes) else ""
    shown = {k: v for k, v in defaults.items() if v not in (None, "")}
    if not shown:
        return only
    if len(set(map(repr, shown.values()))) == 1 and len(classes) == len(owners):
        return f" (default: {next(iter(shown.values()))})"
    return only + " (default: " + ", ".join(f"{v} for {k}" for k, v in shown.items()) + ")"


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    foreign = [n for n in getattr(args, "config_fields", ()) if n not in names and getattr(args, n, None) is not None]
    if foreign:
        arch = ARCH_NAMES.get(cls.__name__, cls.__name__)
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        archs = getattr(args, "archs", {})
        having = [a for a, c in archs.items() if {f.name for f in dataclasses.fields(c)} >= set(foreign)]
        where = f"a setting of --arch {', '.join(having)}" if having else "not a setting of one --arch"
        raise ConfigError(f"{flags}: not a setting of --arch {arch} ({where})")
    kw = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def add_parser(sub: argparse._SubParsersAction) -> None:
    from nextscale.train.config import ARCHS, VAE_ARCHS

    jobs: tuple[tuple[str, dict[str, type], str, str], ...] = (
        (
            "train-vae",
            VAE_ARCHS,
            "train a tokenizer: the multi-scale VQ-VAE (msvq; one scale for LlamaGen) or Infinity's bitwise BSQ-VAE",
            "tokenizer: msvq (VAR, LlamaGen; the default) or bsq (Infinity)",
        ),
        (
            "train",
            ARCHS,
            "train a transformer (VAR, a LlamaGen raster GPT, or Infinity from captions) on a trained tokenizer",
            "transformer family: var (the default), llamagen (a single-scale tokenizer) or infinity (a bsq tokenizer)",
        ),
    )
    for name, archs, text, arch_help in jobs:
        classes = tuple(archs.values())
        description = f"{text}. Runs under torchrun for DDP."
        if name == "train":
            description += (
                " The dataset is tokenized once, into a cache every run shares: $NEXTSCALE_CACHE, else "
                "$XDG_CACHE_HOME/nextscale, else ~/.cache/nextscale (deleting it only costs the tokenizing again)."
            )
        p = sub.add_parser(name, help=text, description=description)
        p.add_argument("--arch", default=next(iter(archs)), help=arch_help)
        add_config_args(p, *classes)
        p.add_argument("--plot", action="store_true", help="write loss.png from metrics.jsonl at the end")
        p.add_argument(
            "--export",
            action="store_true",
            help="do not train: write the model of the newest checkpoint in --out-dir (or --resume-from) now, "
            "with the settings stored in the checkpoint",
        )
        fields = tuple(dict.fromkeys(f.name for c in classes for f in dataclasses.fields(c)))
        p.set_defaults(func=run, archs=archs, config_fields=fields)


def run(args: argparse.Namespace) -> int:
    from nextscale.train.config import train_config_class
    from nextscale.train.metrics_log import plot_losses
    from nextscale.train.runner import export_checkpoint, run_training

    cls = train_config_class(args.arch, args.archs)
    if args.export:
        if not args.out_dir:
            raise ConfigError("--export needs --out-dir: the run folder whose checkpoint to export")
        ignored = [
            "--" + n.replace("_", "-")
            for n in args.config_fields
            if n not in ("out_dir", "resume_from") and getattr(args, n, None) is not None
        ]
        if ignored:
            log.warning("--export takes the run's settings from its checkpoint; ignored: %s", ", ".join(ignored))
        result = export_checkpoint(cls, args.out_dir, args.resume_from)
        log.info("%s", json.dumps({k: v for k, v in result.items() if k != "is_main"}, default=str))
        return 0
    cfg = config_from_args(cls, args)
    result = run_training(cfg)
    if result.get("is_main"):
        if args.plot:
            png = plot_losses(f"{cfg.out_dir}/metrics.jsonl", f"{cfg.out_dir}/loss.png")
            log.info("loss curves -> %s", png)
        log.info("%s", json.dumps({k: v for k, v in result.items() if k != "is_main"}, default=str))
    return 0
