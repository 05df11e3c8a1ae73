"""``nextscale train-vae`` and ``nextscale train``: flags are generated from the frozen training configs, so the
CLI cannot drift from the library (every ``VARTrainConfig`` field is a ``--flag``).

Single process by default; under ``torchrun --nproc_per_node=N`` the same commands run DDP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from typing import Any

from nextscale.errors import ConfigError

log = logging.getLogger("nextscale")

HELP = {
    "data": "fashion-mnist, mnist5k, or an image folder (one sub-folder per class)",
    "out_dir": "run folder: checkpoints/, metrics.jsonl, the exported model",
    "tokenizer": "folder written by `nextscale train-vae` (or a model folder / official vae .pth)",
    "init_from": "fine-tune from a native model folder or an official var_d*.pth",
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
}


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def add_config_args(p: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        t = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = HELP.get(f.name, "") + (f" (default: {default})" if default not in (None, "") else "")
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(t) is tuple:
            p.add_argument(
                flag, type=lambda s: tuple(int(x) for x in s.split(",")), default=None, metavar="A,B,...", help=help_
            )
        else:
            p.add_argument(flag, type=t, default=None, help=help_)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def add_parser(sub: argparse._SubParsersAction) -> None:
    from nextscale.train.config import VAETrainConfig, VARTrainConfig

    for name, cls, text in (
        ("train-vae", VAETrainConfig, "train the multi-scale VQ-VAE tokenizer"),
        ("train", VARTrainConfig, "train the VAR transformer on a trained tokenizer"),
    ):
        p = sub.add_parser(name, help=text, description=f"{text}. Runs under torchrun for DDP.")
        add_config_args(p, cls)
        p.add_argument("--plot", action="store_true", help="write loss.png from metrics.jsonl at the end")
        p.set_defaults(func=run, config_cls=cls)


def run(args: argparse.Namespace) -> int:
    from nextscale.train.metrics_log import plot_losses
    from nextscale.train.runner import run_training

    cfg = config_from_args(args.config_cls, args)
    result = run_training(cfg)
    if result.get("is_main"):
        if args.plot:
            png = plot_losses(f"{cfg.out_dir}/metrics.jsonl", f"{cfg.out_dir}/loss.png")
            log.info("loss curves -> %s", png)
        log.info("%s", json.dumps({k: v for k, v in result.items() if k != "is_main"}, default=str))
    return 0
