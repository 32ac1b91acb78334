"""`python -m qwenvl_jax.demo [--demo_setting=long] [--workdir=DIR] [--shuffle_labels]`.

The same run as `python -m qwenvl_jax.train` without `--config`, with the demo's own knobs: the
shuffled-label control and the seed. Flags only; the work is `qwenvl_jax.demo.run_demo`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from qwenvl_jax.cli import parse_absl_flags
from qwenvl_jax.demo.run import SETTINGS, run_demo
from qwenvl_jax.errors import UserError, run_cli

_SETTING = flags.DEFINE_enum("demo_setting", "default", sorted(SETTINGS), "The demo's size.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; default ./qwenvl_demo_<setting>."
)
_SHUFFLE = flags.DEFINE_bool(
    "shuffle_labels", False, "Train on answers permuted among samples (the control)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the init and the data order.")


def main(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}; flags take the form --name=value")
    workdir = _WORKDIR.value or f"qwenvl_demo_{_SETTING.value}"
    run_demo(workdir, setting=_SETTING.value, shuffle_labels=_SHUFFLE.value, seed=_SEED.value)


if __name__ == "__main__":
    sys.exit(run_cli(lambda: app.run(main, flags_parser=parse_absl_flags)))
