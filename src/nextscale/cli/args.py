"""Validated argument types shared by every subcommand, and a parser whose errors are one line.

Every numeric, device and file option of the CLI is one of these types (``tests/test_cli_bad_input.py`` fails on
a bare ``int``/``float``), so a bad value is refused while the command line is parsed: before a model loads, a
folder is created or a tensor is allocated. Bounds are what the library can honour, not what a typical run uses.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from nextscale.config import MAX_CFG, check_device
from nextscale.errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``nextscale generate: error: argument --num: ... (see --help)``.

    argparse prints the whole usage block before its error; on a long command line that buries the one line that
    says what is wrong. Subparsers inherit the class (``add_subparsers`` uses ``type(self)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(text: str, wanted: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")


@dataclass(frozen=True)
class Int:
    """An integer in ``[lo, hi]`` (``hi=None``: no upper bound beyond a 64-bit value)."""

    lo: int
    hi: int | None = None

    @property
    def __name__(self) -> str:  # argparse names the type in some of its own messages
        return "integer"

    def wanted(self) -> str:
        if self.hi is None:
            return f"an integer >= {self.lo}"
        return f"an integer in {self.lo}..{self.hi:,}".replace(",", "_")

    def __call__(self, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            _fail(text, self.wanted())
        if value < self.lo or value > (self.hi if self.hi is not None else 2**63 - 1):
            _fail(text, self.wanted())
        return value


@dataclass(frozen=True)
class Float:
    """A finite number in ``[lo, hi]`` (``lo_open``: ``lo`` itself is excluded)."""

    lo: float
    hi: float
    lo_open: bool = False

    @property
    def __name__(self) -> str:
        return "number"

    def wanted(self) -> str:
        return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g} and <= {self.hi:g}"

    def __call__(self, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            _fail(text, self.wanted())
        below = value <= self.lo if self.lo_open else value < self.lo
        if not math.isfinite(value) or below or value > self.hi:
            _fail(text, self.wanted())
        return value


class Device:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``; ``config.check_device``); an accelerator that
    is absent is the command's business (sampling falls back to the CPU with a logged message)."""

    __name__ = "device"

    def __call__(self, text: str) -> str:
        try:
            return check_device("device", text.strip())
        except ConfigError:
            _fail(text, "a device such as cpu, cuda, cuda:1 or mps")


@dataclass(frozen=True)
class Pattern:
    """Text matching ``regex`` (whole), e.g. an image size ``1024x576``; ``example`` names the form in the error."""

    regex: str
    example: str

    @property
    def __name__(self) -> str:
        return "text"

    def __call__(self, text: str) -> str:
        if not re.fullmatch(self.regex, text.strip()):
            _fail(text, self.example)
        return text.strip()


class ExistingFile:
    """A path to an existing regular file (checkpoints, class-name lists): named when missing or a folder."""

    __name__ = "file"

    def __call__(self, text: str) -> str:
        path = Path(text).expanduser()
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: no such file")
        return str(path)


# The shared vocabulary: one bound per kind of setting, so two commands cannot disagree about the same option.
SEED = Int(0, 2**63 - 1)  # the per-image generators are seeded from 63-bit values (engine.sampling.derive_seed)
COUNT = Int(1, 10_000_000)  # images per class / samples: beyond this a run takes years on any machine
BATCH = Int(1, 65_536)
IMAGE_SIZE = Pattern(r"[1-9]\d{0,4}[xX][1-9]\d{0,4}", "a size WIDTHxHEIGHT such as 1024x576")
ASPECT = Pattern(r"[1-9]\d{0,3}(\.\d+)?:[1-9]\d{0,3}(\.\d+)?", "an aspect ratio W:H such as 16:9")
TOP_K = Int(0, 10_000_000)  # 0 = off; clamped to the vocabulary
TOP_P = Float(0.0, 1.0)
TEMPERATURE = Float(0.0, 100.0)
PIXELS = Int(8, 16_384)
HEADS = Int(1, 4_096)
PORT = Int(0, 65_535)  # 0: a free port the OS picks
SECONDS = Float(0.0, 7 * 86_400)
MEGABYTES = Float(0.0, 2.0**30, lo_open=True)
PERCENT_POINTS = Float(0.0, 100.0)
DECIBELS = Float(0.0, 200.0)
DEVICE = Device()
FILE = ExistingFile()


CFG = Float(0.0, MAX_CFG)  # what the sampling parameters accept: one bound for the library, the server and the CLI
