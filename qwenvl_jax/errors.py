"""User mistakes vs our bugs: the exception a CLI prints as one line, and the CLI wrapper.

A `UserError` (a file, flag, key or value the user gave that is wrong) reaches the user as one
line `error: <message>` on stderr and exit code 2; anything else is our bug and keeps its
traceback. The subclasses also derive from the builtin a caller would catch (`ValueError`,
`FileNotFoundError`), so library callers need not know this module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user gave is wrong; the message names it and says what would be right."""


class ConfigError(UserError, ValueError):
    """A config key, flag or value that is wrong."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user gave does not exist or does not hold what it should."""


class CheckpointError(UserError, ValueError):
    """A checkpoint, or its config.json, that cannot be read or converted (the message says why)."""


def one_line(message: str) -> str:
    """The first non-empty line of `message` (absl and ml_collections wrap theirs in usage text)."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return str(message).strip()


def run_cli(fn: Callable[[], object]) -> int:
    """Runs a CLI body: a `UserError` prints one line and returns 2; other errors propagate."""
    try:
        fn()
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def optional_import(module: str, extra: str):
    """Imports `module`, or raises a one-line UserError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{module} is not installed: pip install 'qwenvl_jax[{extra}]' (or pip install -e"
            f" '.[{extra}]' in a checkout)"
        ) from None
