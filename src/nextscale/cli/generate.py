"""``nextscale generate``: class labels -> PNG images (a grid, or one file per image)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from nextscale.cli.common import add_model_args, load_pipeline
from nextscale.errors import InvalidInputError

log = logging.getLogger("nextscale")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images for class labels",
                       description="Generate images. Classes are indices or names (e.g. --class sneaker).")
    add_model_args(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--class", dest="classes", action="append", metavar="CLASS", default=None,
                   help="class index or name; repeat for several (default: class 0)")
    s.add_argument("--num", type=int, default=1, help="images per class (default: 1)")
    s.add_argument("--cfg", type=float, default=None,
                   help="guidance, VAR convention (default: the model's recommended value, else 1.5)")
    s.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 = off (official demo: 900)")
    s.add_argument("--top-p", type=float, default=None, help="top-p filter, 0 = off (official demo: 0.95)")
    s.add_argument("--seed", type=int, default=0, help="seed; image i uses a generator derived from (seed, i)")
    s.add_argument("--more-smooth", action="store_true", default=None,
                   help="gumbel-softmax code mixing (visual quality)")
    s.add_argument("--rng", choices=("per_image", "official"), default="per_image",
                   help="per_image (batch-independent, default) or official (one stream for the batch)")
    s.add_argument("--sampler", choices=("fast", "reference"), default="fast", help=argparse.SUPPRESS)
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", default="samples.png",
                   help="PNG file for a grid; an existing directory or a path ending in / gets one file per image")
    o.add_argument("--separate", action="store_true", help="write one file per image next to --output")
    o.add_argument("--grid-cols", type=int, default=None, help="columns of the grid")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise InvalidInputError(f"--num must be >= 1, got {args.num}")
    pipe = load_pipeline(args)
    t0 = time.perf_counter()
    out = pipe(args.classes or [0], cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
               more_smooth=args.more_smooth, num_images_per_label=args.num, rng=args.rng, sampler=args.sampler,
               progress=sys.stderr.isatty() and not args.quiet)
    dt = time.perf_counter() - t0
    tags = [label_tag(lab, pipe.class_names, pipe.num_classes) for lab in out.labels]
    paths = write_images(out.images, tags, args.output, args.separate, args.grid_cols)
    shown = ", ".join(str(p) for p in paths[:4]) + (" ..." if len(paths) > 4 else "")
    log.info("%d image(s) of %s in %.1fs -> %s", len(out.images), ", ".join(sorted(set(tags))), dt, shown)
    return 0


def label_tag(label: int, names: tuple[str, ...], num_classes: int) -> str:
    if label == num_classes:
        return "unconditional"
    return names[label] if names else str(label)


def write_images(images: list, tags: list[str], output: str, separate: bool, grid_cols: int | None) -> list[Path]:
    """A grid at ``output`` (.png), or one ``<stem>_<i>_<tag>.png`` per image (``separate`` or a folder)."""
    from nextscale.images import make_grid

    target = Path(output)
    is_folder = target.is_dir() or output.endswith(("/", "\\"))
    if not (separate or is_folder):
        target = target if target.suffix.lower() == ".png" else target.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, grid_cols).save(target)
        return [target]
    folder, stem = (target, "") if is_folder else (target.parent, target.stem + "_")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (im, tag) in enumerate(zip(images, tags)):
        safe = "".join(c if c.isalnum() else "-" for c in tag).strip("-").lower()
        paths.append(folder / f"{stem}{i:03d}_{safe}.png")
        im.save(paths[-1])
    return paths
