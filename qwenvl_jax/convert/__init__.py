"""Checkpoint interop: HF Qwen-VL (safetensors / PyTorch .bin) <-> our NNX parameters and format.

import_hf(path, scan_layers=...) -> (config, params)    HF directory -> pure parameter dict
export_hf(params, config, out_dir)                      -> safetensors shards + index + json
save_params(dir, params, config) / load_params(dir)     our Orbax format (config.json + params/)
assign_params(model, params)                            put a parameter dict into an NNX model
workdir.load_workdir_params(workdir, step=None)         a training workdir's params, for export
checkpoint_kind(path)                                   "hf", "ours" or "workdir"
python -m qwenvl_jax.convert {import,export} --help     the command line
"""

from qwenvl_jax import fileio
from qwenvl_jax.convert.errors import (
    CheckpointError,
    NotACheckpointError,
    StateDictMismatchError,
    TensorFileError,
    UnsupportedDtypeError,
)
from qwenvl_jax.convert.hf import (
    check_params,
    checkpoint_files,
    export_hf,
    hf_tensors,
    import_hf,
    import_tensors,
)
from qwenvl_jax.convert.mapping import hf_shapes, rules
from qwenvl_jax.convert.ours import is_ours, load_params, save_params
from qwenvl_jax.errors import MissingPathError


def checkpoint_kind(path: str) -> str:
    """ "hf", "ours" or "workdir": which checkpoint a directory (local or gs://) holds.

    The one classifier of `QwenVL.from_pretrained`, `python -m qwenvl_jax.convert` and evaluate.
    A training workdir (`checkpoint.is_workdir`) wins over our format (`ours.is_ours`), which wins
    over HF weight files (`*.safetensors`, `pytorch_model*.bin`).

    Raises:
      MissingPathError (a FileNotFoundError): nothing at `path`, or a file there.
      NotACheckpointError (a MissingPathError): a directory of none of the three kinds; the
        message says what each kind holds and lists what the directory holds.
    """
    from qwenvl_jax import checkpoint

    if not fileio.exists(path):
        raise MissingPathError(f"{path} does not exist")
    if not fileio.isdir(path):
        raise MissingPathError(f"{path} is a file, not a checkpoint directory")
    if checkpoint.is_workdir(path):
        return "workdir"
    if is_ours(path):
        return "ours"
    files = fileio.listdir(path)
    if any(
        f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
        for f in files
    ):
        return "hf"
    names = sorted(n + "/" * fileio.isdir(fileio.join(path, n)) for n in files)
    held = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
    raise NotACheckpointError(
        f"{path} is not a Qwen-VL checkpoint: expected *.safetensors / pytorch_model*.bin (HF),"
        " config.json + params/ (qwenvl_jax format) or config.json + checkpoints/<step>/"
        f" (training workdir); it holds {held}"
    )


def assign_params(model, params, *, source: str = "parameters") -> None:
    """Write a pure parameter dict (numpy or jax arrays) into an NNX model's Params, in place.

    The dict must have exactly the model's parameter paths and shapes (same layer layout); each
    array is cast to the model's parameter dtype.

    Args:
      model: the NNX model to fill.
      params: the pure nested dict.
      source: where `params` came from (a file or directory), for the message.

    Raises:
      TreeMismatchError: a path is missing or extra, or a shape differs (the first of each named).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwenvl_jax import tree

    state = nnx.state(model, nnx.Param)
    tree.check_fits(params, nnx.to_pure_dict(state), source=source)
    pure = jax.tree.map(
        lambda v, x: jax.device_put(jnp.asarray(x, dtype=v.dtype), v.sharding),
        nnx.to_pure_dict(state),
        params,
    )
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


__all__ = [
    "CheckpointError",
    "NotACheckpointError",
    "StateDictMismatchError",
    "TensorFileError",
    "UnsupportedDtypeError",
    "assign_params",
    "check_params",
    "checkpoint_files",
    "checkpoint_kind",
    "export_hf",
    "hf_shapes",
    "hf_tensors",
    "import_hf",
    "import_tensors",
    "load_params",
    "rules",
    "save_params",
]
