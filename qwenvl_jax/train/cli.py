"""The trainer's flag parsing: `--config=` found wherever the package is installed, and config
mistakes as one `ConfigError` line (the convention itself: `qwenvl_jax.cli`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from qwenvl_jax import cli
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import stage_config


def parse_flags(argv: Sequence[str]) -> list[str]:
    """`cli.parse_absl_flags` for `--config` (ml_collections) command lines.

    `--config=configs/<stage>.py[:variant]` names a checkout's file, or the copy installed with
    the package when run elsewhere (`stage_config.resolve`). Besides absl's own mistakes, a config
    file that does not exist or does not load and an `--config.a.b=value` override of a key the
    config does not have (naming the keys it has) end in one line.
    """
    from absl import flags

    args = resolve_config_args(argv)
    try:
        rest = cli.parse_absl_flags(args, explain=_unknown_override)
    except (KeyError, AttributeError) as e:  # ml_collections, on an override of a missing key
        for a in args:
            name = a[2:].partition("=")[0] if a.startswith("--") else ""
            if "." in name and (line := _unknown_override(args, name)):
                raise ConfigError(line) from None
        raise ConfigError(
            f"a --config.* override names a key the config does not have ({e})"
        ) from None
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        flag = flags.FLAGS["config"]
        try:
            flag.value.to_dict()  # a config file that failed to load raises here (lazily)
        except Exception as e:  # noqa: BLE001 - ml_collections re-raises the loader's error
            path = str(flag.serialize()).partition("=")[2].partition(":")[0]
            if path and not os.path.isfile(path):
                raise stage_config.missing_config(path) from None
            raise ConfigError(f"--config={path}: {cli.flag_error_line(str(e))}") from None
    return rest


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """`argv` with the file of each `--config=SPEC` (or `--config SPEC`) resolved."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + stage_config.resolve(a.partition("=")[2])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = stage_config.resolve(out[i + 1])
    return out


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
