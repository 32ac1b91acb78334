"""The trainer: one stage of the paper on one CPU, one GPU or every host of a TPU pod slice.

`python -m qwenvl_jax.train --config=configs/<stage>.py --workdir=DIR` (`__main__`: the flags) calls
`train(config, workdir)` (`loop`), so tests and notebooks run exactly what the command line runs.

- `validate`: the config checked before any work (ranges, cross-field rules, mesh, workdir);
- `state`: the static side of a run (`Setup`): model config and factory, mesh, shardings, optimizer;
- `step`: the loss and the jitted train step (gradient accumulation, donated state);
- `sources`: the first parameters (a previous stage, a converted checkpoint, two towers, random);
- `aot`: the dry run and ahead-of-time compiles for TPU slices;
- `inputs`: what a run trains and evaluates on (`data.train` files, a mixture file, random tokens);
- `loop`: restore or initialise, step, evaluate, log, checkpoint, stop on SIGTERM;
- `stage_config`: the defaults the stage configs in configs/ start from.
"""

from qwenvl_jax.train.aot import aot_compile, compiled_report, dry_run, topology_devices
from qwenvl_jax.train.inputs import make_data_iterator, make_eval_iterator
from qwenvl_jax.train.loop import train
from qwenvl_jax.train.sources import initial_params
from qwenvl_jax.train.state import (
    Setup,
    build,
    check_setup,
    describe,
    init_params,
    merge_model,
    model_config,
    step_model_flops,
)
from qwenvl_jax.train.step import (
    abstract_batch,
    batch_shardings,
    cross_entropy_sum,
    make_eval_step,
    make_train_step,
    to_step_batch,
)

__all__ = [
    "Setup",
    "abstract_batch",
    "aot_compile",
    "batch_shardings",
    "build",
    "check_setup",
    "compiled_report",
    "cross_entropy_sum",
    "describe",
    "dry_run",
    "init_params",
    "initial_params",
    "make_data_iterator",
    "make_eval_iterator",
    "make_eval_step",
    "make_train_step",
    "merge_model",
    "model_config",
    "step_model_flops",
    "to_step_batch",
    "topology_devices",
    "train",
]
