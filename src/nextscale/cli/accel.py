"""``nextscale tune-accel``: pick the fastest acceleration presets that keep fidelity within a budget."""

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
