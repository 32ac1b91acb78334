"""absl flag parsing for the command lines, with user mistakes as one `ConfigError` line."""

from __future__ import annotations

import os
from collections.abc import Sequence

from qwenvl_jax.errors import ConfigError, one_line
from qwenvl_jax.train import stage_config


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
    """`absl.flags` parsing for `app.run(flags_parser=...)` that turns flag errors into UserError.

    Covers an unknown flag, a bad value, a config file that does not exist or does not load, and an
    `--config.a.b=value` override of a key the config does not have (naming the keys it has).
    """
    from absl import flags

    args = list(argv)
    try:
        rest = flags.FLAGS(args)
    except flags.UnrecognizedFlagError as e:
        raise ConfigError(_unknown_override(args, e.flagname or "") or one_line(str(e))) from None
    except flags.Error as e:
        raise ConfigError(_flag_error_line(str(e))) from None
    except (KeyError, AttributeError) as e:  # ml_collections, on an override of a missing key
        for a in args:
            name = a[2:].partition("=")[0] if a.startswith("--") else ""
            if "." in name and (line := _unknown_override(args, name)):
                raise ConfigError(line) from None
        raise ConfigError(
            f"a --config.* override names a key the config does not have ({e})"
        ) from None
    for name in ("config",):
        if name not in flags.FLAGS:
            continue
        flag = flags.FLAGS[name]
        if flag.value is None:
            continue
        try:
            flag.value.to_dict()  # a config file that failed to load raises here (lazily)
        except Exception as e:  # noqa: BLE001 - ml_collections re-raises the loader's error
            path = str(flag.serialize()).partition("=")[2].partition(":")[0]
            if path and not os.path.isfile(path):
                raise ConfigError(f"--{name}: config file {path!r} does not exist") from None
            raise ConfigError(f"--{name}={path}: {_flag_error_line(str(e))}") from None
    return rest


def _flag_error_line(message: str) -> str:
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


def _unknown_override(argv: Sequence[str], flagname: str) -> str | None:
    """For `--config.a.b=v` with no key `a.b`: a line naming it and the keys that exist there."""
    if not flagname or "." not in flagname:
        return None
    if flagname.startswith(("config.data.spec.", "config.eval.spec.")):
        return (
            f"--{flagname}: data sources are not given key by key on the command line; use"
            " --config.data.train=a.json[,b.jsonl] or --config.data.mixture=mixture.json"
            " (configs/data/ has examples)"
        )
    root, _, dotted = flagname.partition(".")
    spec = next((a.partition("=")[2] for a in argv if a.startswith(f"--{root}=")), None)
    if not spec:
        return f"--{flagname}: no --{root}= file was given to override"
    try:
        node = stage_config.load(spec)
    except Exception:  # noqa: BLE001 - the file's own error is reported when it is parsed
        return None
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join([root] + parts[:i])
            return f"--{flagname}: {where} has no key {part!r}; it has {', '.join(keys)}"
        node = node[part]
    return None
