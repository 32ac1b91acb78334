"""Our own checkpoint format: `config.json` (HF keys) plus an Orbax checkpoint of the parameters.

Layout of a directory written by `save_params`::

  config.json      the model config (QWenConfig.to_hf_dict)
  params/          Orbax StandardCheckpointer of the pure parameter dict
  params_meta.json {"scan_layers": bool, "dtypes": [...]}: which layer layout was saved

`load_params` returns either layout whatever was saved (`qwenvl_jax.checkpoint.stack_layers` /
`unstack_layers`, the owners of the layer layouts), as numpy arrays, or as sharded jax arrays when
given an abstract target (e.g. from `nnx.eval_shape`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from qwenvl_jax import fileio
from qwenvl_jax.config import QWenConfig
from qwenvl_jax.convert.errors import CheckpointError
from qwenvl_jax.errors import MissingPathError

META = "params_meta.json"


def _str_keys(tree):
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def save_params(directory: str, params: Any, config: QWenConfig) -> None:
    """Write `config.json`, `params/` (Orbax) and `params_meta.json` into `directory`.

    Args:
      directory: created if needed; must not already hold `params/`.
      params: pure nested dict (or nnx.State / model) of arrays, either layer layout.
      config: the model config.
    """
    import orbax.checkpoint as ocp

    from qwenvl_jax.checkpoint import is_stacked
    from qwenvl_jax.convert.hf import _as_pure_dict

    params = _as_pure_dict(params)
    directory = fileio.absolute(directory)
    fileio.makedirs(directory)
    target = fileio.join(directory, "params")
    if fileio.exists(target):
        raise FileExistsError(f"{target} exists; choose an empty directory")
    config.save_hf_json(directory)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(target, _str_keys(params))
    ckpt.wait_until_finished()
    ckpt.close()
    fileio.write_text(fileio.join(directory, META), json.dumps({"scan_layers": is_stacked(params)}))


def load_params(
    directory: str, *, scan_layers: bool | None = None, abstract: Any = None
) -> tuple[QWenConfig, dict]:
    """Read a directory written by `save_params`.

    Args:
      directory: the checkpoint directory.
      scan_layers: the layout to return; None returns the saved layout. Ignored with `abstract`.
      abstract: optional pytree of jax.ShapeDtypeStruct (with shardings) in the saved layout;
        the arrays are then restored straight onto those devices.

    Returns:
      (config, pure nested dict: numpy arrays, or jax arrays when `abstract` is given).

    Raises:
      MissingPathError (a FileNotFoundError): no params/ in `directory`.
      CheckpointError: a bad config.json, or params/ that Orbax cannot restore.
    """
    import orbax.checkpoint as ocp

    from qwenvl_jax.checkpoint import int_layer_keys, is_stacked, stack_layers, unstack_layers
    from qwenvl_jax.convert.hf import _as_pure_dict, read_config

    directory = fileio.absolute(directory)
    target = fileio.join(directory, "params")
    if not fileio.isdir(target):
        raise MissingPathError(f"{directory} is not a qwenvl_jax checkpoint: no params/ in it")
    cfg = read_config(directory)
    ckpt = ocp.StandardCheckpointer()
    try:
        if abstract is not None:
            params = ckpt.restore(target, _str_keys(_as_pure_dict(abstract)))
            return cfg, int_layer_keys(params)
        params = int_layer_keys(ckpt.restore(target))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a damaged checkpoint
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(
            f"{target}: Orbax cannot restore it ({type(e).__name__}: {first})"
        ) from e
    finally:
        ckpt.close()
    params = jax.tree.map(np.asarray, params)
    if scan_layers is True and not is_stacked(params):
        params = stack_layers(params)
    elif scan_layers is False and is_stacked(params):
        params = unstack_layers(params)
    return cfg, params


def is_ours(directory: str) -> bool:
    """Whether `directory` holds a checkpoint written by `save_params`."""
    return fileio.isdir(fileio.join(directory, "params")) and fileio.isfile(
        fileio.join(directory, "config.json")
    )
