"""``nextscale`` command line: argparse front end; each subcommand parses, builds configs, calls the library.

Bad input ends in one readable line on stderr (exit code 2), never a traceback; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from nextscale import __version__
from nextscale.cli import accel, convert, evaluate, generate, serve, train
from nextscale.errors import NextscaleError

# Subcommand modules: each exposes add_parser(subparsers) and registers its handler as ``func``.
COMMANDS = [generate, convert, serve, train, evaluate, accel]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextscale", description="Visual autoregressive (VAR) image generation.")
    parser.add_argument("--version", action="version", version=f"nextscale {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def _log_to_stderr(level: int) -> None:
    """Messages of the ``nextscale`` loggers go to stderr as plain lines (the CLI's only output channel)."""
    logger = logging.getLogger("nextscale")
    for h in [h for h in logger.handlers if getattr(h, "_nextscale_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._nextscale_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    _log_to_stderr(logging.WARNING if args.quiet else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("nextscale: interrupted", file=sys.stderr)
        return 130
    except (NextscaleError, OSError) as e:
        if args.debug:
            raise
        print(f"nextscale: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
