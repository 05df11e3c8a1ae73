"""Arguments shared by several subcommands: which model to load, on which device and dtype."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

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
    g.add_argument("--checkpoint", metavar="VAR.pth", help="official VAR checkpoint (with --vae)")
    g.add_argument("--vae", metavar="VAE.pth", help="official VQ-VAE checkpoint (with --checkpoint)")
    g.add_argument(
        "--patch-nums",
        type=parse_patch_nums,
        metavar="1,2,3,...",
        help="scale schedule, when it cannot be inferred from the checkpoint",
    )
    g.add_argument("--class-names", metavar="FILE", help="text file with one class name per line")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="weights dtype; auto = bf16 where it is native (GPUs, CPUs with AVX512-BF16/AMX), else float32 "
        "(default: float32, bit-faithful to the official code)",
    )


def parse_patch_nums(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace("_", ",").split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 1,2,3,4, got {text!r}") from e


def read_class_names(path: str | None) -> list[str] | None:
    if not path:
        return None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise InvalidInputError(f"{path}: no class names in file")
    return names


def load_pipeline(args: argparse.Namespace):  # -> VARPipeline (imported lazily: keeps --help fast)
    from nextscale.pipeline import VARPipeline

    names = read_class_names(args.class_names)
    dtype = DTYPES[args.dtype]
    if args.checkpoint or args.vae:
        if not (args.checkpoint and args.vae):
            raise InvalidInputError("--checkpoint and --vae must be given together (the VAR and its VQ-VAE)")
        if args.model:
            raise InvalidInputError("give either --model or --checkpoint/--vae, not both")
        return VARPipeline.from_official(args.checkpoint, args.vae, args.patch_nums, args.device, dtype, names)
    pipe = VARPipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    if names:
        pipe.set_class_names(names)
    return pipe
