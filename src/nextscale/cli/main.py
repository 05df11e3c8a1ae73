"""``nextscale`` command line: argparse front end; each subcommand parses, builds configs, calls the library.

Bad input ends in one readable line on stderr (exit code 2), never a traceback; an unexpected error (a bug) is one
line too, with exit code 1; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from nextscale import __version__
from nextscale.cli import accel, convert, evaluate, generate, serve, train
from nextscale.cli.args import OneLineParser
from nextscale.errors import NextscaleError

# Subcommand modules: each exposes add_parser(subparsers) and registers its handler as ``func``.
COMMANDS = [generate, convert, serve, train, evaluate, accel]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nextscale", description="Visual autoregressive (VAR) image generation.")
    parser.add_argument("--version", action="version", version=f"nextscale {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the one it was made with: in-process
    runs (tests, notebooks) swap ``sys.stderr``, and a handler holding an old one wrote into a closed stream."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # emit runs under the handler's lock
        super().emit(record)


@contextlib.contextmanager
def _log_to_stderr(level: int) -> Iterator[None]:
    """While a command runs, messages of the ``nextscale`` loggers go to stderr as plain lines (the CLI's only
    output channel). The logger is put back as it was afterwards: ``main`` run in-process (tests, notebooks) leaves
    no handler, level or ``propagate`` behind to double or swallow the next caller's records."""
    logger = logging.getLogger("nextscale")
    saved = logger.handlers[:], logger.level, logger.propagate
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, _StderrHandler)] + [handler]
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    with _log_to_stderr(logging.WARNING if args.quiet else logging.INFO):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
    except Exception as e:  # a bug, not bad input: still one line, with the way to the traceback
        if args.debug:
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"nextscale: internal error: {type(e).__name__}{': ' + detail if detail else ''} "
            f"(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
