"""``nextscale tune-accel``: pick the fastest acceleration presets that keep fidelity within a budget;
``nextscale calibrate-kv``: the attention statistics that KV-cache compression (scalekv, hack) plans with."""

from __future__ import annotations

import argparse
import json
import logging

from nextscale.errors import InvalidInputError

log = logging.getLogger("nextscale")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune-accel",
        help="measure acceleration settings on a model and store the fastest within a fidelity budget",
        description="Samples the same images with every candidate combination and exact; writes the fastest "
        "within the budget as the model's balanced/fast presets (model_index.json). Fidelity: class accuracy with "
        "the model's classifier, else PSNR against exact.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="native model folder (written in place)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="balanced: points of accuracy (default 1)")
    p.add_argument("--min-psnr", type=float, default=30.0, help="balanced without a classifier: dB (default 30)")
    p.add_argument("--fast-max-accuracy-drop", type=float, default=5.0, help="fast: points (default 5)")
    p.add_argument("--fast-min-psnr", type=float, default=25.0, help="fast without a classifier: dB (default 25)")
    p.add_argument("--per-class", type=int, default=20, help="images per class for each candidate (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="report only; do not write model_index.json")
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.set_defaults(func=run)

    c = sub.add_parser(
        "calibrate-kv",
        help="find each layer's KV-cache role (ScaleKV) and each head's class (HACK) on a model",
        description="Samples --samples images exactly (labels spread over the classes) while recording attention, "
        "and writes per scale the drafter layers (lowest Attention Selectivity Index) and per head whether it is "
        "contextual. scalekv and hack then plan their per-layer budgets with it: scalekv:budgets=FILE, or by default "
        "from the model folder's kv_budgets.json (the default output for a local folder).",
    )
    c.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID", help="model folder, hub id or bundled name")
    c.add_argument("-o", "--output", default=None, help="JSON to write (default: DIR/kv_budgets.json)")
    c.add_argument("--samples", type=int, default=32, help="calibration images (default 32)")
    c.add_argument("--drafters", type=int, default=None, help="drafter layers per scale (default: depth/8, >= 1)")
    c.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=run_calibrate)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nextscale.jobs.tune import Budget, tune

    if args.per_class < 1:
        raise InvalidInputError(f"--per-class must be >= 1, got {args.per_class}")
    if not (Path(args.model) / "model_index.json").is_file():
        raise InvalidInputError(f"--model {args.model}: not a native model folder (no model_index.json)")
    budget = Budget(args.max_accuracy_drop, args.min_psnr, args.fast_max_accuracy_drop, args.fast_min_psnr)
    report = tune(args.model, budget, args.per_class, args.seed, write=not args.dry_run)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for name, specs in report["presets"].items():
        log.info("%s: %s", name, ",".join(specs) if specs else "none within the budget")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from nextscale.accel import calibrate_kv
    from nextscale.pipeline import KV_ROLES_FILE, VARPipeline

    if args.samples < 1:
        raise InvalidInputError(f"--samples must be >= 1, got {args.samples}")
    out = args.output
    if out is None:
        if not (Path(args.model) / "model_index.json").is_file():
            raise InvalidInputError(f"--model {args.model} is not a local model folder: give -o FILE")
        out = Path(args.model) / KV_ROLES_FILE
    pipe = VARPipeline.from_pretrained(args.model, device=args.device)
    var = pipe.transformer
    if args.drafters is not None and not 0 <= args.drafters <= var.depth:
        raise InvalidInputError(f"--drafters must be in 0..{var.depth}, got {args.drafters}")
    labels = torch.arange(args.samples, device=pipe.device) % var.num_classes
    params = pipe.sampling_params(cfg=args.cfg, seed=args.seed)
    roles = calibrate_kv(
        var, pipe.vae.quantize, labels, params, params.generators(args.samples, pipe.device), args.drafters
    )
    roles.save(out)
    for si in sorted(roles.drafters)[1:]:
        log.info("scale %d: drafter layers %s", si, list(roles.drafters[si]))
    contextual = sum(sum(row) for row in roles.contextual)
    log.info("contextual heads: %d of %d; wrote %s", contextual, var.depth * var.num_heads, out)
    return 0
