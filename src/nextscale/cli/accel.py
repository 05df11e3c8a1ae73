"""``nextscale tune-accel``: pick the fastest acceleration presets that keep fidelity within a budget;
``nextscale calibrate-kv``: the attention statistics that KV-cache compression (scalekv, hack) plans with."""

from __future__ import annotations

import argparse
import json
import logging

from nextscale.cli.args import CFG, COUNT, DECIBELS, DEVICE, PERCENT_POINTS, SEED, Int
from nextscale.errors import InvalidInputError

log = logging.getLogger("nextscale")

CALIBRATION_KV_MB = 8192.0  # the KV memory one calibration batch may take


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune-accel",
        help="measure acceleration settings on a model and store the fastest within a fidelity budget",
        description="Samples the same images with every candidate combination and exact; writes the fastest "
        "within the budget as the model's balanced/fast presets (model_index.json). Fidelity: class accuracy with "
        "the model's classifier, else PSNR against exact.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="native model folder (written in place)")
    p.add_argument(
        "--max-accuracy-drop", type=PERCENT_POINTS, default=1.0, help="balanced: points of accuracy (default 1)"
    )
    p.add_argument("--min-psnr", type=DECIBELS, default=30.0, help="balanced without a classifier: dB (default 30)")
    p.add_argument("--fast-max-accuracy-drop", type=PERCENT_POINTS, default=5.0, help="fast: points (default 5)")
    p.add_argument("--fast-min-psnr", type=DECIBELS, default=25.0, help="fast without a classifier: dB (default 25)")
    p.add_argument("--per-class", type=COUNT, default=20, help="images per class for each candidate (default 20)")
    p.add_argument("--seed", type=SEED, default=0)
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
    c.add_argument("--samples", type=Int(1, 100_000), default=32, help="calibration images (default 32)")
    c.add_argument(
        "--drafters", type=Int(0, 4096), default=None, help="drafter layers per scale (default: depth/8, >= 1)"
    )
    c.add_argument("--cfg", type=CFG, default=None, help="guidance scale (default: the model's)")
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--device", type=DEVICE, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    c.set_defaults(func=run_calibrate)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nextscale.fileio import atomic_file, check_file_target
    from nextscale.jobs.tune import Budget, tune

    if args.json:
        check_file_target(args.json, f"--json {args.json}")
    if not (Path(args.model) / "model_index.json").is_file():
        raise InvalidInputError(f"--model {args.model}: not a native model folder (no model_index.json)")
    if not args.dry_run:  # the presets are written into the folder: find out now, not after the measurements
        check_file_target(Path(args.model) / "model_index.json", f"--model {args.model}")
    budget = Budget(args.max_accuracy_drop, args.min_psnr, args.fast_max_accuracy_drop, args.fast_min_psnr)
    report = tune(args.model, budget, args.per_class, args.seed, write=not args.dry_run)
    if args.json:
        text = json.dumps(report, indent=2) + "\n"
        atomic_file(args.json, lambda f: f.write(text.encode()))
    for name, specs in report["presets"].items():
        log.info("%s: %s", name, ",".join(specs) if specs else "none within the budget (runs exact)")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from nextscale.accel import calibrate_kv
    from nextscale.fileio import check_file_target
    from nextscale.pipelines.var import KV_ROLES_FILE, VARPipeline

    out = args.output
    if out is None:
        if not (Path(args.model) / "model_index.json").is_file():
            raise InvalidInputError(f"--model {args.model} is not a local model folder: give -o FILE")
        out = Path(args.model) / KV_ROLES_FILE
    check_file_target(out, f"-o {out}")
    pipe = VARPipeline.from_pretrained(args.model, device=args.device)
    var = pipe.transformer
    # Calibration samples all images in one batch (attention statistics are recorded across it): size it first.
    fits = pipe.suggested_batch_size(kv_budget_mb=CALIBRATION_KV_MB, cap=args.samples)
    if args.samples > fits:
        raise InvalidInputError(
            f"--samples {args.samples}: calibration runs one batch and this model's KV caches allow at most {fits} "
            f"images in {CALIBRATION_KV_MB / 1024:g} GB (the default, 32, is plenty)"
        )
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
