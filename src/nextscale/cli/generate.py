"""``nextscale generate``: class labels -> images (a grid, or one file per image), any number of them.

Images are sampled in chunks of ``--batch-size`` and each chunk's files are written (atomically) as soon as it is
done, so memory stays flat however large ``--num`` is; a folder output resumes by skipping the files that exist
(image i always comes from the seed (seed, i), so a resumed job writes exactly the images of an uninterrupted one).
Every output option is checked before any sampling.

Works with either model family: a VAR model, or a raster (LlamaGen) one, where ``--cfg`` is LlamaGen's cfg_scale and
``--cfg-interval``, ``--temperature`` and ``--speculative`` apply; an option of the other family is refused in one
line, before the model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nextscale.cli.common import ALL_FAMILIES, add_model_args, load_pipeline, refuse_options, resolve_model
from nextscale.errors import InvalidInputError
from nextscale.images import auto_grid_cols

log = logging.getLogger("nextscale")

# A grid holds every image in memory and in one file: beyond this it is no longer something to look at.
MAX_GRID_IMAGES = 256
MAX_GRID_PIXELS = 64 * 2**20
GRID_PAD = 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images for class labels",
        description="Generate images. Classes are indices or names (e.g. --class sneaker).",
    )
    add_model_args(p)
    s = p.add_argument_group("sampling")
    s.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="CLASS",
        default=None,
        help="class index or name; repeat for several (default: class 0)",
    )
    s.add_argument("--num", type=int, default=1, help="images per class (default: 1)")
    s.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="guidance (default: the model's recommended value): VAR convention (else 1.5), or LlamaGen's "
        "cfg_scale for a raster model (else 4.0; <= 1 = unguided)",
    )
    s.add_argument(
        "--top-k", type=int, default=None, help="top-k filter, 0 = off (VAR demo: 900; LlamaGen default: 2000)"
    )
    s.add_argument(
        "--top-p", type=float, default=None, help="top-p filter (VAR: 0 = off, demo 0.95; LlamaGen: 1.0 = off)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed; image i uses a generator derived from (seed, i)")
    s.add_argument(
        "--more-smooth", action="store_true", default=None, help="gumbel-softmax code mixing (visual quality)"
    )
    s.add_argument(
        "--rng",
        choices=("per_image", "official"),
        default="per_image",
        help="per_image (batch-independent, default) or official (one stream for the batch)",
    )
    s.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images sampled at once (default: chosen from the model's KV-cache size)",
    )
    s.add_argument("--sampler", choices=("fast", "reference"), default="fast", help=argparse.SUPPRESS)
    s.add_argument(
        "--accel",
        action="append",
        metavar="SPEC",
        default=None,
        help="acceleration: a preset (exact, balanced, fast) or a plug-in spec such as cfg-cutoff, "
        "fastvar:keep=0.4, skip-scales:last=1, code:draft=8; repeat to combine (lossy: see README)",
    )
    r = p.add_argument_group("raster (LlamaGen) models only")
    r.add_argument(
        "--cfg-interval",
        type=float,
        default=None,
        help="stop guidance after this many decode steps (default: -1, guidance throughout)",
    )
    r.add_argument("--temperature", type=float, default=None, help="logits temperature (default: 1.0)")
    r.add_argument(
        "--speculative",
        metavar="SPEC",
        default=None,
        help="speculative decoding: an acceptance rule and its window (see nextscale.accel.speculative)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "-o",
        "--output",
        default="samples.png",
        help="a grid image (.png, .jpg/.jpeg or .webp); an existing directory or a path ending in / gets "
        "one PNG per image (existing files are kept: an interrupted run resumes)",
    )
    o.add_argument(
        "--separate",
        action="store_true",
        help="one file per image next to --output, named after it (<stem>_<i>_<class>.<ext>)",
    )
    o.add_argument("--grid-cols", type=int, default=None, help="columns of the grid (default: automatic, about square)")
    p.set_defaults(func=run)


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclass(frozen=True)
class OutputPlan:
    """Where the images go, decided and checked before sampling."""

    folder: Path | None  # one file per image in this folder, or None for a grid at ``grid``
    grid: Path | None
    stem: str = ""
    suffix: str = ".png"
    grid_cols: int | None = None

    def image_path(self, index: int, tag: str, total: int) -> Path:
        assert self.folder is not None
        safe = "".join(c if c.isalnum() else "-" for c in tag).strip("-").lower()
        return self.folder / f"{self.stem}{index:0{max(3, len(str(total - 1)))}d}_{safe}{self.suffix}"


def plan_output(output: str, separate: bool, grid_cols: int | None, total: int, image_size: int) -> OutputPlan:
    """Validate the output options against the job; one-line errors, before anything is sampled."""
    if grid_cols is not None and grid_cols < 1:
        raise InvalidInputError(f"--grid-cols must be >= 1 (omit it for an automatic layout), got {grid_cols}")
    target = Path(output)
    if target.is_dir() or output.endswith(("/", "\\")):
        return OutputPlan(folder=target, grid=None)
    suffix = target.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidInputError(
            f"-o {output}: unknown image format {target.suffix or '(no extension)'!r}; use "
            f"{', '.join(FORMATS)} (or a folder ending in / for one PNG per image)"
        )
    if separate:
        return OutputPlan(folder=target.parent, grid=None, stem=target.stem + "_", suffix=suffix)
    cols = grid_cols or auto_grid_cols(total)
    rows = math.ceil(total / cols)
    side = image_size + GRID_PAD
    pixels = (cols * side + GRID_PAD) * (rows * side + GRID_PAD)
    if total > MAX_GRID_IMAGES or pixels > MAX_GRID_PIXELS:
        raise InvalidInputError(
            f"a grid of {total} images ({pixels / 2**20:.0f} megapixels) is too large: at most {MAX_GRID_IMAGES} "
            f"images and {MAX_GRID_PIXELS // 2**20} megapixels; write one file per image with -o DIR/ instead"
        )
    return OutputPlan(folder=None, grid=target, grid_cols=cols)


# Sampling options of one family only (the model options are checked in ``load_pipeline``).
FAMILY_OPTIONS = {"var": ("--accel", "--more-smooth"), "raster": ("--cfg-interval", "--temperature", "--speculative")}


def run(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise InvalidInputError(f"--num must be >= 1, got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    resolved = resolve_model(args)
    refuse_options(args, resolved[0], FAMILY_OPTIONS)
    pipe = load_pipeline(args, ALL_FAMILIES, resolved)
    labels = pipe.labels(args.classes or [0], args.num).tolist()
    total = len(labels)
    plan = plan_output(args.output, args.separate, args.grid_cols, total, pipe.image_size)
    batch = args.batch_size or pipe.suggested_batch_size()
    if args.rng == "official" and total > batch:
        raise InvalidInputError(
            f"--rng official draws all {total} images from one stream, so they must be one "
            f"batch: pass --batch-size {total} (or use --rng per_image)"
        )
    tags = [label_tag(lab, pipe.class_names, pipe.num_classes) for lab in labels]
    todo = list(range(total))
    if plan.folder is not None:
        plan.folder.mkdir(parents=True, exist_ok=True)
        if args.rng == "per_image":  # only per-image seeds make a file independent of the rest of the job
            todo = [i for i in todo if not _exists(plan.image_path(i, tags[i], total))]
            if len(todo) < total:
                log.info(
                    "%d of %d image(s) already in %s: generating the other %d",
                    total - len(todo),
                    total,
                    plan.folder,
                    len(todo),
                )
    settings = sampling_settings(args, pipe, resolved[0])
    grid_images: list = []
    t0 = time.perf_counter()
    with _Progress(len(todo), sys.stderr.isatty() and not args.quiet) as progress:
        for c in range(0, len(todo), batch):
            chunk = todo[c : c + batch]
            out = pipe([labels[i] for i in chunk], image_indices=chunk, **settings)
            if plan.folder is None:
                grid_images.extend(out.images)
            else:
                for i, im in zip(chunk, out.images):
                    save_image(im, plan.image_path(i, tags[i], total))
            progress.update(len(chunk))
    dt = time.perf_counter() - t0
    if plan.grid is not None:
        from nextscale.images import make_grid

        save_image(make_grid(grid_images, plan.grid_cols, GRID_PAD), plan.grid)
    where = plan.grid if plan.grid is not None else plan.folder
    log.info("%d image(s) of %s in %.1fs -> %s", len(todo), ", ".join(dict.fromkeys(tags)), dt, where)
    return 0


def sampling_settings(args: argparse.Namespace, pipe, family: str) -> dict:
    """The pipeline call's keyword arguments for this family, checked (acceleration plan, speculative spec, sampling
    values) before any sampling."""
    settings = {
        "cfg": args.cfg,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "rng": args.rng,
        "sampler": args.sampler,
    }
    if family == "raster":
        settings.update(cfg_interval=args.cfg_interval, temperature=args.temperature, speculative=args.speculative)
        pipe.sampling_params(args.cfg, args.cfg_interval, args.top_k, args.top_p, args.temperature, args.seed)
        if args.speculative is not None:
            pipe.speculative_config(args.speculative)
        return settings
    pipe.plan(args.accel)  # an unknown or impossible combination fails here, before any sampling
    return {**settings, "accel": args.accel, "more_smooth": args.more_smooth}


def label_tag(label: int, names: tuple[str, ...], num_classes: int) -> str:
    if label == num_classes:
        return "unconditional"
    return names[label] if names else str(label)


def save_image(image, path: Path) -> None:  # image: PIL.Image
    """Write atomically in the format the extension names: a full disk or a kill never leaves a torn file."""
    from nextscale.fileio import atomic_file

    atomic_file(path, lambda f: image.save(f, format=FORMATS[path.suffix.lower()]))


def _exists(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


class _Progress:
    """A tqdm bar (images/s, ETA) on a terminal; elsewhere a log line at most every 10 s."""

    def __init__(self, total: int, bar: bool):
        self.total, self.done, self.t0, self.last = total, 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        if bar and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc="generating")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= 10 and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.t0)
            log.info(
                "%d/%d images (%.1f images/s, ETA %.0fs)", self.done, self.total, rate, (self.total - self.done) / rate
            )

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
