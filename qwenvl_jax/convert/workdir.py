"""The parameters of a training workdir (the trainer's Orbax steps), for export to HF format.

A workdir, as `qwenvl_jax.checkpoint` lays it out: `config.json` (the model config, HF keys) and
`checkpoints/<step>/{params,opt_state,meta}/`. The reading is `qwenvl_jax.checkpoint.read_params`
(numpy, whole on this host, local or gs://); this module fixes the export's view of it: the
per-layer layout of the HF keys, whatever layout the run trained in.
"""

from __future__ import annotations

from typing import Any

from qwenvl_jax import checkpoint
from qwenvl_jax.config import QWenConfig


def load_workdir_params(
    workdir: str, step: int | None = None
) -> tuple[QWenConfig, dict[str, Any], int]:
    """The config and per-layer parameters of one step of a training workdir.

    Args:
      workdir: a directory written by the trainer (config.json + checkpoints/<step>/).
      step: the step to read; None reads the latest complete one that restores.

    Returns:
      (config, pure nested dict of numpy arrays with per-layer dicts keyed by int, the step).

    Raises:
      CheckpointError: no checkpoints/, no config.json, no complete step, no step `step` (the
        message lists those there are), or a step Orbax cannot restore.
    """
    return checkpoint.read_params(workdir, step, scan_layers=False)


__all__ = ["load_workdir_params"]
