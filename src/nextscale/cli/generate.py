"""``nextscale generate``: class labels or prompts -> images (a grid, or one file per image), any number of them.

Images are sampled in chunks of ``--batch-size`` and each chunk's files are written (atomically) as soon as it is
done, so memory stays flat however large ``--num`` is; a folder output resumes by skipping the files that exist
(image i always comes from the seed (seed, i), so a resumed job writes exactly the images of an uninterrupted one).
Image i's file is ``<i>_<class>.png`` with i zero-padded to 3 digits (``007_bag.png``, ``1234_bag.png``) whatever
the total, so a run with a larger ``--num`` keeps what a smaller one wrote; files named by earlier releases, which
padded to the total's digits (``0007_bag.png``), count as done too. The job's size (``--num`` per class times the
classes), the output format and the target folder's writability are checked before the model is loaded.

Works with every model family: class-conditional ones (VAR; raster/LlamaGen, where ``--cfg`` is LlamaGen's cfg_scale)
take ``--class``, text-to-image ones (Infinity) ``--prompt`` (the file name then carries the prompt's first words).
A family's own options (its pipeline's ``sampling_options``) are refused for another family in one line, before the
model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nextscale.cli.args import ASPECT, BATCH, CFG, COUNT, IMAGE_SIZE, SEED, TEMPERATURE, TOP_K, TOP_P, Float, Int
from nextscale.cli.common import add_model_args, family_flags, load_pipeline, refuse_options, resolve_model, where
from nextscale.config import PN_SCALES
from nextscale.errors import InvalidInputError
from nextscale.fileio import check_writable
from nextscale.images import auto_grid_cols

log = logging.getLogger("nextscale")

# A grid holds every image in memory and in one file: beyond this it is no longer something to look at.
MAX_GRID_IMAGES = 256
MAX_GRID_PIXELS = 64 * 2**20
GRID_PAD = 2
# A folder run beyond this takes years on any machine (and its resume scan alone, hours): refused up front.
MAX_FOLDER_IMAGES = 10_000_000
# Image i's file is <i padded to at least this many digits>_<class>.png, whatever the job's size: a run with a
# larger --num resumes the files of a smaller one instead of renaming (and regenerating) them all.
MIN_DIGITS = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images for class labels",
        description="Generate images. Classes are indices or names (e.g. --class sneaker).",
    )
    add_model_args(p)
    s = p.add_argument_group("sampling")
    s.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        default=None,
        help="text-to-image models: the prompt; repeat for several (--num images each)",
    )
    s.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="CLASS",
        default=None,
        help="class index or name; repeat for several (default: class 0)",
    )
    s.add_argument(
        "--num", type=COUNT, default=1, help="images per class: --num 4 with two --class gives 8 (default: 1)"
    )
    s.add_argument(
        "--cfg",
        type=CFG,
        default=None,
        help="guidance (default: the model's recommended value): VAR convention (else 1.5), or LlamaGen's "
        "cfg_scale for a raster model (else 4.0; <= 1 = unguided)",
    )
    s.add_argument(
        "--top-k",
        type=TOP_K,
        default=None,
        help="top-k filter, 0 = off (default: the model's recommended value, else 0 for VAR and 2000 for LlamaGen)",
    )
    s.add_argument(
        "--top-p",
        type=TOP_P,
        default=None,
        help="top-p filter (default: the model's recommended value; VAR: 0 = off, LlamaGen: 1.0 = off)",
    )
    s.add_argument("--seed", type=SEED, default=0, help="seed; image i uses a generator derived from (seed, i)")
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
        type=BATCH,
        default=None,
        help="images sampled at once (default: chosen from the model's KV-cache size)",
    )
    s.add_argument("--sampler", choices=("fast", "reference"), default=None, help=argparse.SUPPRESS)
    s.add_argument(
        "--accel",
        action="append",
        metavar="SPEC",
        default=None,
        help="acceleration: a preset (exact, balanced, fast) or a plug-in spec such as cfg-cutoff, "
        "fastvar:keep=0.4, skip-scales:last=1, code:draft=8; repeat to combine (lossy: see README)",
    )
    t = p.add_argument_group("text-to-image (Infinity) models only")
    t.add_argument("--negative-prompt", metavar="TEXT", default=None, help="replaces the null text of guidance")
    t.add_argument(
        "--tau", type=Float(1e-3, 100.0), default=None, help="temperature of the bit logits (default: the model's, 0.5)"
    )
    sizes = t.add_mutually_exclusive_group()
    sizes.add_argument(
        "--size",
        type=IMAGE_SIZE,
        metavar="WIDTHxHEIGHT",
        default=None,
        help="image size, e.g. 1024x576: the nearest of the model's aspect templates (default: square)",
    )
    sizes.add_argument(
        "--aspect", dest="size", type=ASPECT, metavar="W:H", help="aspect ratio instead of a size, e.g. 16:9"
    )
    t.add_argument(
        "--pn",
        choices=tuple(PN_SCALES),
        default=None,
        help="pixel budget at 16 px per token: 0.06M = 256x256 ... 1M = 1024x1024 (default: the model's)",
    )
    r = p.add_argument_group("raster (LlamaGen) models only")
    r.add_argument(
        "--cfg-interval",
        type=Float(-1.0, 1e9),
        default=None,
        help="stop guidance after this many decode steps (default: -1, guidance throughout)",
    )
    r.add_argument("--temperature", type=TEMPERATURE, default=None, help="logits temperature (default: 1.0)")
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
        "one PNG per image, <i>_<class>.png with i padded to 3 digits whatever --num is (existing files are "
        "kept: an interrupted or enlarged run resumes)",
    )
    o.add_argument(
        "--separate",
        action="store_true",
        help="one file per image next to --output, named after it (<stem>_<i>_<class>.<ext>)",
    )
    o.add_argument(
        "--grid-cols", type=Int(1, 4096), default=None, help="columns of the grid (default: automatic, about square)"
    )
    p.set_defaults(func=run)


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclass(frozen=True)
class OutputPlan:
    """Where the images go, decided and checked before the model is loaded."""

    folder: Path | None  # one file per image in this folder, or None for a grid at ``grid``
    grid: Path | None
    stem: str = ""
    suffix: str = ".png"
    grid_cols: int | None = None

    def image_path(self, index: int, tag: str, digits: int = MIN_DIGITS) -> Path:
        """Image ``index``'s file: its name depends on the index and class only, never on the job's size."""
        assert self.folder is not None
        safe = "".join(c if c.isalnum() else "-" for c in tag).strip("-").lower()
        return self.folder / f"{self.stem}{index:0{digits}d}_{safe}{self.suffix}"

    def legacy_digits(self) -> tuple[int, ...]:
        """The zero-paddings wider than ``MIN_DIGITS`` that files in the folder use (earlier releases padded to
        the total's digits: ``0005_bag.png`` in a job of 1,000+): a resumed run counts those files as done.
        One streaming pass over the folder; no names are kept."""
        if self.folder is None or not self.folder.is_dir():
            return ()
        pattern = re.compile(re.escape(self.stem) + rf"(0\d{{{MIN_DIGITS},}})_.*" + re.escape(self.suffix))
        found: set[int] = set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                m = pattern.fullmatch(entry.name)
                if m:
                    found.add(len(m.group(1)))
        return tuple(sorted(found))

    def check_grid_pixels(self, total: int, image_size: int) -> None:
        """The grid's size in pixels, once the model (its image size) is known; still before any sampling."""
        if self.grid is None or self.grid_cols is None:
            return
        side = image_size + GRID_PAD
        pixels = (self.grid_cols * side + GRID_PAD) * (math.ceil(total / self.grid_cols) * side + GRID_PAD)
        if pixels > MAX_GRID_PIXELS:
            raise InvalidInputError(
                f"a grid of {total} images of {image_size} px is {pixels / 1e6:.1f} megapixels, too large: at most "
                f"{MAX_GRID_PIXELS / 1e6:.1f}; write one file per image with -o DIR/ instead"
            )


def plan_output(output: str, separate: bool, grid_cols: int | None, total: int) -> OutputPlan:
    """Validate the output options against the job's size (``--num`` x classes) and check that the target folder
    can be written; one-line errors, before the model is loaded or anything is sampled or created."""
    if grid_cols is not None and grid_cols < 1:
        raise InvalidInputError(f"--grid-cols must be >= 1 (omit it for an automatic layout), got {grid_cols}")
    plan = _output_kind(output, separate, grid_cols, total)
    if plan.folder is not None and total > MAX_FOLDER_IMAGES:
        raise InvalidInputError(
            f"-o {output}: {total:,} images is too many for one run: at most {MAX_FOLDER_IMAGES:,} "
            "(--num is per class: the total is --num times the number of --class)"
        )
    target = plan.folder if plan.folder is not None else Path(output).parent
    check_writable(target, f"-o {output}")
    return plan


def _output_kind(output: str, separate: bool, grid_cols: int | None, total: int) -> OutputPlan:
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
    if total > MAX_GRID_IMAGES:
        raise InvalidInputError(
            f"a grid of {total:,} images is too large: at most {MAX_GRID_IMAGES} images; write one file per image "
            "with -o DIR/ instead"
        )
    return OutputPlan(folder=None, grid=target, grid_cols=grid_cols or auto_grid_cols(total))


def run(args: argparse.Namespace) -> int:
    asked = args.prompts or args.classes or [0]
    total = args.num * len(asked)  # sized from the arguments: nothing is built, loaded or created before the checks
    plan = plan_output(args.output, args.separate, args.grid_cols, total)
    resolved = resolve_model(args)
    refuse_options(args, resolved[0], family_flags("sampling_options"))  # model options: load_pipeline
    pipe = load_pipeline(args, resolved=resolved)
    plan.check_grid_pixels(total, pipe.image_size)
    conditions, tags = _conditions(args, pipe)  # image i is of conditions[i // num]
    batch = args.batch_size or pipe.suggested_batch_size()
    if args.rng == "official" and total > batch:
        raise InvalidInputError(
            f"--rng official draws all {total} images from one stream, so they must be one "
            f"batch: pass --batch-size {total} (or use --rng per_image)"
        )
    settings = sampling_settings(args, pipe, min(batch, total))
    todo = _todo(plan, args, total, tags)
    t0 = time.perf_counter()
    grid_images = _sample(pipe, plan, todo, conditions, tags, args, batch, settings)
    dt = time.perf_counter() - t0
    if plan.grid is not None:
        from nextscale.images import make_grid

        save_image(make_grid(grid_images, plan.grid_cols, GRID_PAD), plan.grid)
    where = plan.grid if plan.grid is not None else plan.folder
    log.info(
        "%d image(s) of %s%s in %.1fs -> %s",
        len(todo),
        ", ".join(dict.fromkeys(tags)),
        _job(args, total, len(todo)),
        dt,
        where,
    )
    return 0


def _todo(plan: OutputPlan, args: argparse.Namespace, total: int, tags: list[str]) -> Sequence[int]:
    """The indices to sample: all of them, or for a folder the ones not on disk yet (8 bytes an index, however
    large the job). Creates the folder: called once every setting is checked."""
    if plan.folder is None:
        return range(total)
    plan.folder.mkdir(parents=True, exist_ok=True)
    if args.rng != "per_image":  # only per-image seeds make a file independent of the rest of the job
        return range(total)
    digits = (MIN_DIGITS, *plan.legacy_digits())
    todo = array(
        "q",
        (i for i in range(total) if not any(_exists(plan.image_path(i, tags[i // args.num], d)) for d in digits)),
    )
    if len(todo) < total:
        log.info(
            "%d of %d image(s) already in %s: generating the other %d", total - len(todo), total, plan.folder, len(todo)
        )
    return todo


def _sample(
    pipe,
    plan: OutputPlan,
    todo: Sequence[int],
    conditions: list,
    tags: list[str],
    args: argparse.Namespace,
    batch: int,
    settings: dict,
) -> list:
    """Sample ``todo`` in chunks of ``batch``; a folder's files are written as each chunk is done, a grid's images
    are returned."""
    grid_images: list = []
    with _Progress(len(todo), sys.stderr.isatty() and not args.quiet) as progress:
        for c in range(0, len(todo), batch):
            chunk = list(todo[c : c + batch])
            out = pipe([conditions[i // args.num] for i in chunk], image_indices=chunk, **settings)
            if plan.folder is None:
                grid_images.extend(out.images)
            else:
                for i, im in zip(chunk, out.images):
                    save_image(im, plan.image_path(i, tags[i // args.num]))
            progress.update(len(chunk))
    return grid_images


def _job(args: argparse.Namespace, total: int, sampled: int) -> str:
    """What the job was, when the count alone would mislead: --num is per class, and a resume skips files."""
    parts = []
    what = "prompt" if args.prompts else "class"
    n = len(args.prompts or args.classes or [0])
    if n > 1:
        parts.append(f"{args.num} per {what} x {n} {what}{'es' if what == 'class' else 's'}")
    if sampled < total:
        parts.append(f"{total - sampled} of {total} already there")
    return f" ({'; '.join(parts)})" if parts else ""


def sampling_settings(args: argparse.Namespace, pipe, batch: int) -> dict:
    """The pipeline call's keyword arguments: the shared ones and the family's own (``sampling_options``), checked
    (acceleration plan, speculative spec, sampling values) before any sampling."""
    settings = {
        "cfg": args.cfg,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "rng": args.rng,
        # the family's own options that were given (the others keep the pipeline's defaults)
        **{name: getattr(args, name) for name in pipe.sampling_options if getattr(args, name) is not None},
    }
    settings = pipe.checked_settings(settings, batch)
    accel = settings.get(pipe.accel_option) if pipe.accel_option else None
    if accel is not None:  # what a preset or spec runs: the model's tuned preset, the built-in one, as given
        log.info("%s %s", _flag(pipe.accel_option), pipe.describe_accel(accel))
    return settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _conditions(args: argparse.Namespace, pipe) -> tuple[list, list[str]]:
    """What each --class or --prompt asks for, and its tag in file names: class ids (a class-conditional model)
    or prompts (a text-to-image model, ``pipe.num_classes == 0``)."""
    if pipe.num_classes == 0:
        if args.classes:
            raise InvalidInputError(f"--class is for class-conditional models; {where(args)} takes --prompt TEXT")
        if not args.prompts:
            raise InvalidInputError(f"{where(args)} is a text-to-image model: pass --prompt TEXT")
        return list(args.prompts), [prompt_tag(p) for p in args.prompts]
    if args.prompts:
        raise InvalidInputError(f"--prompt is for text-to-image models; {where(args)} takes --class")
    ids = pipe.labels(args.classes or [0], 1).tolist()  # one label per --class
    return ids, [label_tag(lab, pipe.class_names, pipe.num_classes) for lab in ids]


def prompt_tag(prompt: str, limit: int = 40) -> str:
    """A prompt's first words as a file-name part: "a red bag, left" -> "a-red-bag-left"."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    tag = "-".join(words)[:limit].strip("-")
    return tag or "prompt"


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
