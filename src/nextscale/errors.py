"""Exceptions raised at the package's boundaries.

Every user-facing error names the offending value and what is allowed; the CLI prints ``str(err)`` as one
line. They subclass ``ValueError`` so callers that already catch bad-argument errors keep working.
"""

from __future__ import annotations


class NextscaleError(ValueError):
    """Base class of all errors nextscale raises on bad input."""


class ConfigError(NextscaleError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(NextscaleError):
    """A weights file or model folder is unreadable, corrupt, or not what was expected."""


class InvalidInputError(NextscaleError):
    """A sampling argument (class, cfg, top-k, mask, ...) is invalid."""
