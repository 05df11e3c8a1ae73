"""Arguments shared by several subcommands: which model to load, on which device and dtype.

A model is a native folder or hub id (``--model``; its ``model_index.json`` names the family), official files
(``--checkpoint`` + ``--vae``; the family is read from the checkpoint's keys), or the bundled demo model (VAR).
``load_pipeline`` returns a ``VARPipeline`` or a ``LlamaGenPipeline`` accordingly, for the families a command
supports; VAR models load exactly as they always have.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nextscale.cli.args import DEVICE, FILE, HEADS, PIXELS
from nextscale.errors import InvalidInputError, NextscaleError

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",  # bf16 where it is native (GPU, AVX512-BF16/AMX CPU), else float32
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the bundled demo model)")
    g.add_argument("--model", metavar="DIR_OR_HUB_ID", help="native model folder or Hugging Face hub repo id")
    g.add_argument(
        "--checkpoint",
        type=FILE,
        metavar="FILE",
        help="official checkpoint: VAR var_d*.pth or LlamaGen c2i_*.pt (with --vae)",
    )
    g.add_argument(
        "--vae",
        type=FILE,
        metavar="FILE",
        help="its official tokenizer: VAR vae_*.pth or LlamaGen vq_ds16_c2i.pt (with --checkpoint)",
    )
    g.add_argument(
        "--patch-nums",
        type=parse_patch_nums,
        metavar="1,2,3,...",
        help="VAR: scale schedule, when it cannot be inferred from the checkpoint",
    )
    add_llamagen_file_args(g)
    g.add_argument("--class-names", type=FILE, metavar="FILE", help="text file with one class name per line")
    g.add_argument("--device", type=DEVICE, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="weights dtype; auto = bf16 where it is native (GPUs, CPUs with AVX512-BF16/AMX), else float32 "
        "(default: float32, bit-faithful to the official code)",
    )


def add_llamagen_file_args(g: Any) -> None:
    """What an official LlamaGen GPT file does not say (an argument group or parser)."""
    g.add_argument(
        "--n-head", type=HEADS, metavar="N", help="LlamaGen GPT: attention heads (default: the release's for its width)"
    )
    g.add_argument(
        "--image-size",
        type=PIXELS,
        metavar="PX",
        help="LlamaGen GPT: image size, fixing the token grid (default: the file name's _256/_384, else 256)",
    )


def parse_patch_nums(text: str) -> tuple[int, ...]:
    try:
        nums = tuple(int(x) for x in text.replace("_", ",").split(",") if x.strip())
    except ValueError:
        nums = ()
    if not nums or any(n < 1 or n > 1024 for n in nums):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token-map sides like 1,2,3,4 (1..1024), got {text!r}"
        )
    return nums


def read_class_names(path: str | None) -> list[str] | None:
    if not path:
        return None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise InvalidInputError(f"{path}: no class names in file")
    return names


# Model families: ``model_index.json``'s pipeline class names them (``models.native.FAMILIES``).
FAMILY_NAMES = {"var": "VAR (next-scale)", "raster": "raster (LlamaGen)"}
ALL_FAMILIES = ("var", "raster")
# Keys only a LlamaGen GPT (c2i or t2i) or LlamaGen VQ tokenizer file holds.
_RASTER_KEYS = ("tok_embeddings.weight", "encoder.conv_blocks.0.res.0.conv1.weight")


def checkpoint_family(path: str | Path) -> str:
    """``"raster"`` for a readable LlamaGen GPT or VQ file, else ``"var"`` (whose loader then reads the file and
    reports any problem with it exactly as before)."""
    from nextscale.models.llamagen_weights import read_llamagen_state_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = read_llamagen_state_dict(path)
    except (NextscaleError, OSError):
        return "var"
    return "raster" if any(k in sd for k in _RASTER_KEYS) else "var"


def resolve_model(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The family (``"var"`` or ``"raster"``) of the model ``args`` name, and its folder when it is a native one.

    Anything that is not recognisably a raster model goes down the VAR path unchanged (the bundled models, and
    paths VAR's loader refuses with its own messages)."""
    if args.checkpoint or args.vae:
        if not (args.checkpoint and args.vae):
            raise InvalidInputError("--checkpoint and --vae must be given together (the model and its tokenizer)")
        if args.model:
            raise InvalidInputError("give either --model or --checkpoint/--vae, not both")
        return checkpoint_family(args.checkpoint), None
    if args.model is None:
        return "var", None
    from nextscale.models.native import model_family, resolve_model_dir
    from nextscale.pipelines.var import bundled_model_dir

    p = Path(args.model)
    bundled = bundled_model_dir(str(args.model))
    if not p.exists() and bundled.is_dir():  # a bundled model's name: demo-fmnist, demo-fmnist-raster, ...
        return ("raster", bundled) if model_family(bundled) == "raster" else ("var", None)
    try:
        folder = resolve_model_dir(args.model)
        return model_family(folder), folder
    except NextscaleError:
        return "var", None


def where(args: argparse.Namespace) -> str:
    """How to name the model ``args`` point at in a message."""
    return str(args.model or args.checkpoint or "the bundled demo model")


def refuse_options(
    args: argparse.Namespace, family: str, options: Mapping[str, Sequence[str]], subject: str | None = None
) -> None:
    """One-line error for an option of another family: ``options`` maps a family to its own flags; ``subject``
    names the model in the message (default: ``where(args)``)."""
    for other, flags in options.items():
        if other == family:
            continue
        for flag in flags:
            if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None:
                allowed = ", ".join(options.get(family, ())) or "none"
                raise InvalidInputError(
                    f"{flag} is an option of {FAMILY_NAMES[other]} models; {subject or where(args)} is a "
                    f"{FAMILY_NAMES[family]} model (its own options: {allowed})"
                )


MODEL_OPTIONS = {"var": ("--patch-nums",), "raster": ("--n-head", "--image-size")}


def load_pipeline(
    args: argparse.Namespace, families: Sequence[str] = ("var",), resolved: tuple[str, Path | None] | None = None
) -> Any:  # VARPipeline | LlamaGenPipeline (imported lazily: keeps --help fast)
    """The pipeline ``args`` name, of one of ``families`` (a command's supported families; one-line error for
    another). ``resolved``: ``resolve_model(args)`` when the caller already has it."""
    family, folder = resolved or resolve_model(args)
    if family not in families:
        command = getattr(args, "command", None) or "this command"
        raise InvalidInputError(
            f"nextscale {command} supports {', '.join(FAMILY_NAMES[f] for f in families)} models; {where(args)} is a "
            f"{FAMILY_NAMES[family]} model"
        )
    refuse_options(args, family, MODEL_OPTIONS)
    if family == "raster":
        return _load_raster(args, folder)
    return _load_var(args)


def _load_var(args: argparse.Namespace) -> Any:
    from nextscale.pipelines.var import VARPipeline

    names = read_class_names(args.class_names)
    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        return VARPipeline.from_official(args.checkpoint, args.vae, args.patch_nums, args.device, dtype, names)
    pipe = VARPipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    if names:
        pipe.set_class_names(names)
    return pipe


def _load_raster(args: argparse.Namespace, folder: Path | None) -> Any:
    from nextscale.pipelines.raster import LlamaGenPipeline

    names = read_class_names(args.class_names)
    dtype = DTYPES[args.dtype]
    if folder is None:
        return LlamaGenPipeline.from_official(
            args.checkpoint, args.vae, args.image_size, args.n_head, args.device, dtype, names
        )
    pipe = LlamaGenPipeline.from_pretrained(folder, device=args.device, dtype=dtype)
    if names:
        pipe.set_class_names(names)
    return pipe
