"""Training entry point: `python -m qwenvl_jax.train --config=configs/X.py[:variant] --workdir=DIR`.

Runs one stage of the paper (configs/pretrain.py, multitask.py, sft.py) on one CPU, one GPU or every
host of a TPU pod slice (run the same command on each host). Without --config it runs the out-of-box
demo (`qwenvl_jax.demo`): synthetic data, the tiny model, the three stages, then evaluation.

Data: `--config.data.train=a.json,b.jsonl` (official fine-tuning files) or
`--config.data.mixture=mixture.json` (configs/data/), held-out `--config.eval.data=...`; a full-size
stage with neither stops at start, `configs/<stage>.py:data=random` trains on random tokens.

Flags: --config (ml_collections file, `--config.a.b=value` overrides; `configs/<stage>.py` is the
checkout's file, or the copy installed with the package when run from elsewhere), --workdir,
--dry_run (print the resolved config, the mesh and per-device bytes without allocating, on any
machine: laid out for the slice `--config.aot.slice` names, v5p-64 for the 7B stages, or `local`;
with `--config.aot.topology` set and the `tpu` extra installed, compile the train step ahead of time
for that TPU slice and print its memory and FLOPs), --coordinator/--num_processes/--process_id
(multi-process without a TPU pod). Flags only: the work is `qwenvl_jax.train.train` and
`qwenvl_jax.train.dry_run`. The command-line convention (`qwenvl_jax.cli`): a user mistake (a config
file or override key that does not exist, a bad value) ends in one line naming it, exit 2."""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from qwenvl_jax import cli, compiler
from qwenvl_jax import sharding as shd
from qwenvl_jax.errors import UserError
from qwenvl_jax.train.aot import command_line, dry_run
from qwenvl_jax.train.cli import parse_flags
from qwenvl_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Stage config file[:variant], e.g. configs/multitask.py:tiny (configs/ is the checkout's, or"
    " the copy installed with the package).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (local or gs://).")
_DEMO_SETTING = flags.DEFINE_enum(
    "demo_setting",
    "default",
    ["quick", "default", "long"],
    "Without --config: the demo's setting.",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Print config, mesh and per-device bytes for --config.aot.slice (or AOT-compile for"
    " --config.aot.topology); allocates nothing.",
)
_COORD = flags.DEFINE_string("coordinator", None, "jax.distributed coordinator host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
_PID = flags.DEFINE_integer("process_id", None, "jax.distributed process id.")
_DIST = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)."
)


def main(argv) -> None:
    del argv  # cli.absl_main refuses positional words
    from absl import logging as absl_logging

    # Orbax logs every save at INFO; the progress line is printed, warnings still show.
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    # Before JAX starts its backends (distributed init and the first computation start them).
    compiler.apply_flags()
    if cfg is None:
        # The entry point's default job is the demo; only this line depends on it (the trainer's
        # modules never import the demo, the demo imports the trainer).
        from qwenvl_jax.demo import run_demo

        run_demo(
            _WORKDIR.value or os.path.join(os.getcwd(), "qwenvl_demo"), setting=_DEMO_SETTING.value
        )
        return
    if _DRY_RUN.value:
        dry_run(cfg, command=command_line(sys.argv))
        return
    if not _WORKDIR.value:
        raise UserError("--workdir is required (where checkpoints, logs and TensorBoard files go)")
    shd.initialize_distributed(_COORD.value, _NPROC.value, _PID.value, auto=_DIST.value)
    train(cfg, _WORKDIR.value)


if __name__ == "__main__":
    cli.absl_main(main, parse_flags)
