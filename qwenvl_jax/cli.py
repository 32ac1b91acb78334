"""The command-line convention of every `python -m qwenvl_jax.<tool>`, and the parsers that keep it.

- `--help` prints what the tool does and its flags; exit 0.
- Flags are `--name=value` (`--name value` works too), names in lower_snake_case; a boolean is
  `--name` alone. No abbreviations: `--bench` is not `--benchmark`.
- A user mistake (an unknown flag, a bad value, a missing file, any `errors.UserError` the work
  raises) is one line `error: ...` on stderr, exit 2 (`errors.run_cli`). Anything else is our
  bug and keeps its traceback.

Two parsers serve it. The trainer and the tools beside it (`train`, `bench`, `demo`) use absl flags,
because the trainer's ml_collections `--config.a.b=value` overrides are absl flags:
`absl_main(main, parse)`, with `parse_absl_flags` turning absl's errors into one line. The library's
tools (`convert` with its subcommands and positional paths, `evaluate`, and the coming `serve` and
`prep`) use `ArgumentParser` with `main(run)`; both list value flags as `--name=VALUE`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from qwenvl_jax.errors import ConfigError, one_line, run_cli


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description verbatim (our module docstrings), and value flags listed as `--name=VALUE`,
    the form the convention writes."""

    def _format_usage(self, usage, actions, groups, prefix) -> str:
        text = super()._format_usage(usage, actions, groups, prefix)
        return re.sub(r"(--[\w-]+)\s+(?=[A-Z{])", r"\1=", text)  # `--out DIR` -> `--out=DIR`

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{option}={value}" for option in action.option_strings)


class ArgumentParser(argparse.ArgumentParser):
    """argparse under the convention: the module docstring as the help text, verbatim; no
    abbreviated flags; a parse error raises `ConfigError` (one line through `run_cli`), so a
    `main(argv)` called from Python returns 2 instead of exiting."""

    def __init__(self, prog: str, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def main(run: Callable[[], object]) -> int:
    """Runs a command's body (its parsing included) under the convention; the exit code."""
    return run_cli(run)


_HELP = {"--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"}


def parse_absl_flags(
    argv: Sequence[str], explain: Callable[[Sequence[str], str], str | None] | None = None
) -> list[str]:
    """`absl.flags` parsing for `app.run(flags_parser=...)` with each flag error one `ConfigError`.

    Args:
      argv: the command line, program name first.
      explain: optional `(argv, flag name) -> line or None`, a better line for an unknown flag
        (the trainer names the keys a `--config.a.b` override could have meant).
    """
    from absl import flags

    args = list(argv)
    try:
        return flags.FLAGS(args)
    except SystemExit as e:  # absl's --help (and --helpfull) print the help, then exit 1
        if e.code == 1 and _HELP.intersection(args[1:]):
            raise SystemExit(0) from None
        raise
    except flags.UnrecognizedFlagError as e:
        line = explain(args, e.flagname or "") if explain else None
        raise ConfigError(line or one_line(str(e))) from None
    except flags.Error as e:
        raise ConfigError(flag_error_line(str(e))) from None


def flag_error_line(message: str) -> str:
    """The informative line of an absl flag error (ml_collections appends the loader's traceback:
    its last line names the real problem)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[-1] != lines[0]:
        last = lines[-1]
        kind, sep, text = last.partition(": ")
        if sep and "." in kind or kind.endswith(("Error", "Exception")):
            last = text
        return f"{lines[0].rstrip(':')}: {last}"
    return lines[0] if lines else str(message)


def absl_main(
    main_fn: Callable[[list[str]], object],
    flags_parser: Callable[[Sequence[str]], list[str]] = parse_absl_flags,
) -> NoReturn:
    """`app.run(main_fn)` under the convention: positional words are refused, user errors are one
    line and exit 2; exits the process."""
    from absl import app

    def checked(argv):
        if len(argv) > 1:
            raise ConfigError(f"unexpected argument {argv[1]!r}; flags take the form --name=value")
        return main_fn(argv)

    sys.exit(run_cli(lambda: app.run(checked, flags_parser=flags_parser)))
