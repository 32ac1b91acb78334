"""The parameters of a training workdir (the trainer's Orbax steps), for export to HF format.

A workdir, as `qwenvl_jax.checkpoint` lays it out: `config.json` (the model config, HF keys) and
`checkpoints/<step>/{params,opt_state,meta}/`. Orbax gives a step directory its final name only
once the save is complete, so every listed step is complete. Only `params` is read (as numpy, whole
on this host: no devices or mesh of the training run are needed); the optimizer state is not.
The workdir may be local or `gs://` (through `qwenvl_jax.fileio`; Orbax reads GCS itself).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from qwenvl_jax import checkpoint, fileio
from qwenvl_jax.config import QWenConfig
from qwenvl_jax.convert import ours
from qwenvl_jax.convert.errors import CheckpointError
from qwenvl_jax.convert.hf import read_config


def is_workdir(path: str) -> bool:
    """Whether `path` is laid out as a training workdir (holds `checkpoints/`)."""
    return fileio.isdir(fileio.join(path, checkpoint.CKPT_DIR))


def _manager(workdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        fileio.path(fileio.absolute(workdir)) / checkpoint.CKPT_DIR,
        item_names=("params", "opt_state", "meta"),
        item_handlers={
            "params": ocp.PyTreeCheckpointHandler(),
            "opt_state": ocp.PyTreeCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(create=False),
    )


def workdir_steps(workdir: str) -> list[int]:
    """The complete steps saved in a training workdir, ascending."""
    mngr = _manager(workdir)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def load_workdir_params(
    workdir: str, step: int | None = None
) -> tuple[QWenConfig, dict[str, Any], int]:
    """The config and per-layer parameters of one step of a training workdir.

    Args:
      workdir: a directory written by the trainer (config.json + checkpoints/<step>/).
      step: the step to read; None reads the latest complete one.

    Returns:
      (config, pure nested dict of numpy arrays with per-layer dicts keyed by int, the step).

    Raises:
      CheckpointError: no config.json, no complete step, no step `step` (the message lists those
        there are), or a step Orbax cannot restore.
    """
    if not is_workdir(workdir):
        raise CheckpointError(f"{workdir} is not a training workdir: no {checkpoint.CKPT_DIR}/")
    steps = workdir_steps(workdir)
    if not steps:
        raise CheckpointError(
            f"{workdir} is a training workdir without a complete checkpoint under"
            f" {checkpoint.CKPT_DIR}/ (a run that has not saved yet?)"
        )
    if not fileio.isfile(fileio.join(workdir, "config.json")):
        raise CheckpointError(
            f"{workdir} is a training workdir without config.json (the trainer writes it at start)"
        )
    cfg = read_config(workdir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{workdir} has no step {step}; its complete steps are {steps}")
    import orbax.checkpoint as ocp

    mngr = _manager(workdir)
    try:
        md = mngr.item_metadata(step)["params"]
        # Every array whole into host memory as numpy: restoring onto the saved shardings would
        # need the training run's devices.
        as_numpy = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), getattr(md, "tree", md)
        )
        out = mngr.restore(
            step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(restore_args=as_numpy))
        )
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a damaged step
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        others = [s for s in steps if s != step]
        raise CheckpointError(
            f"{workdir}: step {step} cannot be restored ({type(e).__name__}: {first});"
            f" other complete steps: {others}"
        ) from e
    finally:
        mngr.close()
    params = ours._int_layer_keys(jax.tree.map(np.asarray, out["params"]))
    if ours.is_stacked(params):  # a run with scan_layers
        params = ours.unstack_layers(params)
    return cfg, params, step


__all__ = ["is_workdir", "load_workdir_params", "workdir_steps"]
