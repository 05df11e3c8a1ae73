"""``nextscale convert`` (official .pth -> native folder) and ``nextscale info`` (what a file or folder holds)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from nextscale.cli.common import parse_patch_nums, read_class_names

log = logging.getLogger("nextscale")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert official VAR + VQ-VAE .pth files to a native model folder")
    p.add_argument("var", metavar="VAR.pth")
    p.add_argument("vae", metavar="VAE.pth")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="model folder to write")
    p.add_argument("--patch-nums", type=parse_patch_nums, metavar="1,2,3,...")
    p.add_argument("--class-names", metavar="FILE", help="text file with one class name per line")
    p.set_defaults(func=run_convert)

    q = sub.add_parser("info", help="show the configuration and parameter counts of a checkpoint or folder")
    q.add_argument("path", metavar="FILE_OR_DIR")
    q.add_argument("--patch-nums", type=parse_patch_nums, metavar="1,2,3,...")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=run_info)


def run_convert(args: argparse.Namespace) -> int:
    from nextscale.pipeline import VARPipeline

    names = read_class_names(args.class_names)
    pipe = VARPipeline.from_official(args.var, args.vae, args.patch_nums, class_names=names)
    out = pipe.save_pretrained(args.output)
    log.info(
        "wrote %s (VAR %s params, VQ-VAE %s params)", out, f"{_count(pipe.transformer):,}", f"{_count(pipe.vae):,}"
    )
    return 0


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(path: str | Path, patch_nums: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Configuration and parameter counts of an official .pth file or a native model folder."""
    import torch

    from nextscale.config import VARConfig, VQVAEConfig
    from nextscale.errors import CheckpointError
    from nextscale.models.native import load_native
    from nextscale.models.tokenizers.msvq import VQVAE
    from nextscale.models.var import VAR
    from nextscale.models.weights import infer_vae_config, infer_var_config, read_state_dict

    path = Path(path)
    if path.is_dir():
        var, vae, _index = load_native(path)
        return {
            "format": "native",
            "path": str(path),
            "transformer": {"params": _count(var), "config": var.cfg.to_dict()},
            "vae": {"params": _count(vae), "config": vae.cfg.to_dict()},
        }
    sd = read_state_dict(path)
    cfg: VARConfig | VQVAEConfig
    try:
        cfg = infer_var_config(sd, patch_nums, str(path))
        kind = "transformer"
    except CheckpointError as var_err:
        try:
            cfg = infer_vae_config(sd, patch_nums, str(path))
            kind = "vae"
        except CheckpointError:
            raise var_err from None
    # Counted on a meta-device model, not over the file's tensors (which include buffers): the same number
    # `info` shows for the folder `convert` makes of this file.
    with torch.device("meta"):
        params = _count(VAR(cfg) if isinstance(cfg, VARConfig) else VQVAE(cfg))
    return {
        "format": "official",
        "path": str(path),
        kind: {"params": params, "tensors": len(sd), "config": cfg.to_dict()},
    }


def run_info(args: argparse.Namespace) -> int:
    info = describe(args.path, args.patch_nums)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']} ({info['format']} format)")
    for kind in ("transformer", "vae"):
        if kind not in info:
            continue
        part = info[kind]
        print(f"  {kind}: {part['params']:,} parameters")
        for k, v in part["config"].items():
            if k == "class_names" and v:
                v = f"{len(v)} names: {', '.join(v[:5])}{', ...' if len(v) > 5 else ''}"
            print(f"    {k}: {v}")
    return 0
