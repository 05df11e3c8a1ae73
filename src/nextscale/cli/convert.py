"""``nextscale convert`` (official files -> native folder) and ``nextscale info`` (what a file or folder holds).

Every registered family: the family is told by the checkpoint's keys (files) or by ``model_index.json`` (folders);
its pipeline class reads the files (``from_official``) and describes them (``describe_model``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from nextscale.cli.args import FILE
from nextscale.cli.common import (
    add_infinity_file_args,
    add_llamagen_file_args,
    checkpoint_family,
    family_names,
    model_options,
    parse_patch_nums,
    read_class_names,
    refuse_options,
)
from nextscale.errors import InvalidInputError

log = logging.getLogger("nextscale")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert official files (VAR + VQ-VAE .pth, or LlamaGen GPT + VQ .pt) to a native model folder",
    )
    p.add_argument("var", type=FILE, metavar="MODEL_FILE", help="VAR var_d*.pth or LlamaGen c2i_*.pt")
    p.add_argument("vae", type=FILE, metavar="TOKENIZER_FILE", help="VAR vae_*.pth or LlamaGen vq_ds16_c2i.pt")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="model folder to write: a new or empty folder, or an earlier model folder (one with model_index.json), "
        "which is replaced; anything else there is refused unless --force",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write DIR even when a file or a folder with other files is there: it is moved aside to DIR.old "
        "(kept, never deleted) and the model folder takes its place",
    )
    p.add_argument("--patch-nums", type=parse_patch_nums, metavar="1,2,3,...", help="VAR: scale schedule")
    p.add_argument("--class-names", type=FILE, metavar="FILE", help="text file with one class name per line")
    add_llamagen_file_args(p)
    add_infinity_file_args(p)
    p.set_defaults(func=run_convert)

    q = sub.add_parser("info", help="show the family, configuration and parameter counts of a checkpoint or folder")
    q.add_argument("path", metavar="FILE_DIR_OR_NAME", help="a checkpoint, a model folder, a bundled model or a hub id")
    q.add_argument("--patch-nums", type=parse_patch_nums, metavar="1,2,3,...", help="VAR: scale schedule")
    add_llamagen_file_args(q)
    add_infinity_file_args(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=run_info)


def run_convert(args: argparse.Namespace) -> int:
    from nextscale.fileio import MODEL_INDEX, folder_target

    # Before any weights are read: a target that cannot be written fails now, not after the conversion.
    folder_target(args.output, (MODEL_INDEX,), args.force, "--force")
    family = checkpoint_family(args.var)
    refuse_options(args, family, model_options(), args.var)
    from nextscale.pipelines.base import count_params
    from nextscale.pipelines.registry import family_title, pipeline_class

    cls = pipeline_class(family)
    options = {o: getattr(args, o) for o in cls.official_options if getattr(args, o, None) is not None}
    pipe = cls.from_official(args.var, args.vae, class_names=read_class_names(args.class_names), **options)
    out = pipe.save_pretrained(args.output, overwrite=args.force)
    log.info(
        "wrote %s (%s: transformer %s params, tokenizer %s params)",
        out,
        family_title(family),
        f"{count_params(pipe.transformer):,}",
        f"{count_params(pipe.vae):,}",
    )
    return 0


def describe(path: str | Path, **options: Any) -> dict[str, Any]:
    """Family, configuration and parameter counts of an official checkpoint file or a native model folder (the
    family's ``describe_model``); ``options``: the ``from_official`` options a file cannot tell (``patch_nums``,
    ``n_head``, ...), those of another family ignored."""
    from nextscale.pipelines.registry import pipeline_class

    path = Path(path)
    family = _folder_family(path) if path.is_dir() else checkpoint_family(path)
    cls = pipeline_class(family)
    return dict(cls.describe_model(path, **{o: options[o] for o in cls.official_options if o in options}))


def _folder_family(path: Path) -> str:
    from nextscale.pipelines.registry import family_of_folder

    return family_of_folder(path)


def _info_target(text: str) -> Path:
    """A file or folder as given; else a bundled model's name (``demo-fmnist``) or a hub id, as ``--model`` takes."""
    path = Path(text)
    if path.exists():
        return path
    from nextscale.models.native import bundled_model_dir, resolve_model_dir

    if text and "/" not in text and bundled_model_dir(text).is_dir():
        return bundled_model_dir(text)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return resolve_model_dir(text)
    raise InvalidInputError(f"{text}: no such file or folder (nor a bundled model's name or a hub id)")


def run_info(args: argparse.Namespace) -> int:
    path = _info_target(args.path)
    family = _folder_family(path) if path.is_dir() else checkpoint_family(path)
    refuse_options(args, family, model_options(), args.path)
    info = describe(path, **{k: v for k, v in vars(args).items() if v is not None and k != "path"})
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']} ({info['format']} format)")
    print(f"  family: {family_names()[info['family']]}")
    for kind in ("transformer", "vae"):
        if kind not in info:
            continue
        part = info[kind]
        print(f"  {kind}: {part['params']:,} parameters" + (f" ({part['kind']})" if "kind" in part else ""))
        for k, v in part["config"].items():
            if k == "class_names" and v:
                v = _names(v)
            print(f"    {k}: {v}")
    if info.get("text_encoder"):
        print(f"  text_encoder: {info['text_encoder']}")
    if info.get("sampling_defaults"):
        print(f"  sampling_defaults: {info['sampling_defaults']}")
    if info.get("class_names"):
        print(f"  class_names: {_names(info['class_names'])}")
    return 0


def _names(names: list[str]) -> str:
    return f"{len(names)} names: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
