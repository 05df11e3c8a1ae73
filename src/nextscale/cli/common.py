"""Arguments shared by several subcommands: which model to load, on which device and dtype.

A model is a native folder or hub id (``--model``; its ``model_index.json`` names the family), official files
(``--checkpoint`` + ``--vae``; the family is read from the checkpoint's keys), or the bundled demo model (VAR).
``load_pipeline`` returns a ``VARPipeline`` or a ``LlamaGenPipeline`` accordingly, for the families a command
supports; VAR models load exactly as they always have.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nextscale.cli.args import DEVICE, FILE, HEADS, PIXELS
from nextscale.errors import InvalidInputError

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
    add_infinity_file_args(g)
    g.add_argument("--class-names", type=FILE, metavar="FILE", help="text file with one class name per line")
    g.add_argument("--device", type=DEVICE, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="weights dtype; auto = bf16 where it is native (GPUs, CPUs with AVX512-BF16/AMX), else float32 "
        "(default: float32, bit-faithful to the official code)",
    )


def add_infinity_file_args(g: Any) -> None:
    """What official Infinity files do not include: the T5 text encoder (an argument group or parser)."""
    g.add_argument(
        "--text-encoder",
        metavar="DIR_OR_HUB_ID",
        help="Infinity: the T5 encoder folder or hub id for official files (default: google/flan-t5-xl)",
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


# The default model: the bundled demo (a native folder, whose model_index.json names its family like any other).
DEFAULT_MODEL = "demo-fmnist"


def family_names() -> dict[str, str]:
    """Every registered family and how messages name it."""
    from nextscale.pipelines.registry import families, family_title

    return {f: family_title(f) for f in families()}


def checkpoint_family(path: str | Path) -> str:
    """The family of an official model or tokenizer file (one-line error for a file no family reads)."""
    from nextscale.pipelines.registry import family_of_file

    return family_of_file(path)


def family_flags(attribute: str) -> dict[str, tuple[str, ...]]:
    """Each family's flags named by its pipeline class's ``attribute``: keyword names (``official_options``, the
    ``from_official`` options its checkpoint files cannot tell; ``sampling_options``, its own ``__call__`` keywords)
    or one name (``accel_option``), as ``--flags``."""
    from nextscale.pipelines.registry import families, pipeline_class

    def flags(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
        names = (names,) if isinstance(names, str) else names or ()
        return tuple("--" + n.replace("_", "-") for n in names)

    return {f: flags(getattr(pipeline_class(f), attribute)) for f in families()}


def model_options() -> dict[str, tuple[str, ...]]:
    """Each family's ``from_official`` options as flags (what its checkpoint files cannot tell)."""
    return family_flags("official_options")


def resolve_model(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The family of the model ``args`` name, and its folder when it is a native one (a bundled model's name, a
    folder or a hub id; ``None`` for official files)."""
    if args.checkpoint or args.vae:
        if not (args.checkpoint and args.vae):
            raise InvalidInputError("--checkpoint and --vae must be given together (the model and its tokenizer)")
        if args.model:
            raise InvalidInputError("give either --model or --checkpoint/--vae, not both")
        family, tokenizer_family = checkpoint_family(args.checkpoint), checkpoint_family(args.vae)
        if tokenizer_family != family:
            names = family_names()
            raise InvalidInputError(
                f"--vae {args.vae} is a {names[tokenizer_family]} file but --checkpoint {args.checkpoint} is a "
                f"{names[family]} model: pass the tokenizer of its own family"
            )
        return family, None
    from nextscale.models.native import bundled_model_dir, resolve_model_dir
    from nextscale.pipelines.registry import family_of_folder

    name = str(args.model or DEFAULT_MODEL)
    bundled = bundled_model_dir(name) if "/" not in name else None
    folder = bundled if bundled is not None and not Path(name).exists() and bundled.is_dir() else None
    folder = folder or resolve_model_dir(name)
    return family_of_folder(folder), folder


def where(args: argparse.Namespace) -> str:
    """How to name the model ``args`` point at in a message."""
    return str(args.model or args.checkpoint or "the bundled demo model")


def refuse_options(
    args: argparse.Namespace, family: str, options: Mapping[str, Sequence[str]], subject: str | None = None
) -> None:
    """One-line error for an option of another family: ``options`` maps a family to its own flags; ``subject``
    names the model in the message (default: ``where(args)``)."""
    names = family_names()
    own = set(options.get(family, ()))
    for other, flags in options.items():
        if other == family:
            continue
        for flag in flags:
            if flag in own:  # shared by name (--accel of VAR and Infinity): the model's own option
                continue
            if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None:
                allowed = ", ".join(options.get(family, ())) or "none"
                raise InvalidInputError(
                    f"{flag} is an option of {names[other]} models; {subject or where(args)} is a "
                    f"{names[family]} model (its own options: {allowed})"
                )


def load_pipeline(
    args: argparse.Namespace, families: Sequence[str] | None = None, resolved: tuple[str, Path | None] | None = None
) -> Any:  # a family's pipeline (imported lazily: keeps --help fast)
    """The pipeline ``args`` name, of one of ``families`` (a command's supported families, default all; one-line
    error for another). ``resolved``: ``resolve_model(args)`` when the caller already has it."""
    from nextscale.pipelines.registry import pipeline_class

    family, folder = resolved or resolve_model(args)
    if families is not None and family not in families:
        command = getattr(args, "command", None) or "this command"
        names = family_names()
        raise InvalidInputError(
            f"nextscale {command} supports {', '.join(names[f] for f in families)} models; {where(args)} is a "
            f"{names[family]} model"
        )
    refuse_options(args, family, model_options())
    cls = pipeline_class(family)
    names = read_class_names(args.class_names)
    dtype = DTYPES[args.dtype]
    if folder is None:
        options = {o: getattr(args, o) for o in cls.official_options if getattr(args, o, None) is not None}
        return cls.from_official(
            args.checkpoint, args.vae, device=args.device, dtype=dtype, class_names=names, **options
        )
    pipe = cls.from_pretrained(folder, device=args.device, dtype=dtype)
    if names:
        pipe.set_class_names(names)
    return pipe
