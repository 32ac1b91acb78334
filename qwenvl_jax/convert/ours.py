"""Our own checkpoint format: `config.json` (HF keys) plus an Orbax checkpoint of the parameters.

Layout of a directory written by `save_params`::

  config.json      the model config (QWenConfig.to_hf_dict)
  params/          Orbax StandardCheckpointer of the pure parameter dict
  params_meta.json {"scan_layers": bool, "dtypes": [...]}: which layer layout was saved

`load_params` returns either layout whatever was saved (`stack_layers` / `unstack_layers`), as
numpy arrays, or as sharded jax arrays when given an abstract target (e.g. from `nnx.eval_shape`).
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

LAYER_LISTS = (("transformer", "h"), ("transformer", "visual", "transformer", "resblocks"))
META = "params_meta.json"


def _is_layer_key(k) -> bool:
    return isinstance(k, int) or (isinstance(k, str) and k.isdigit())


def _map_layer_lists(params: Mapping, fn) -> dict:
    """Apply fn to the two layer-list nodes, copying the dicts on the way (no array copies)."""

    def rec(node, path):
        node = dict(node)
        node[path[0]] = fn(node[path[0]]) if len(path) == 1 else rec(node[path[0]], path[1:])
        return node

    out = params
    for path in LAYER_LISTS:
        if _lookup(out, path) is not None:  # a one-tower tree lacks the other list
            out = rec(out, path)
    return out


def _lookup(tree: Mapping, path: tuple):
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def is_stacked(params: Mapping) -> bool:
    """True when the layers are stacked dicts (scan_layers layout).

    Looks at the decoder layers, or at the ViT blocks for a ViT-only tree (a stage-1 tower).
    """
    for path in LAYER_LISTS:
        node = _lookup(params, path)
        if node is not None:
            return not any(_is_layer_key(k) for k in node)
    raise ValueError("the parameters hold neither transformer.h nor visual resblocks")


def stack_layers(params: Mapping) -> dict:
    """Per-layer dicts keyed 0..L-1 -> one dict whose leaves have a leading layer axis."""

    def stack(d):
        if not any(_is_layer_key(k) for k in d):
            return d
        keys = sorted(d, key=int)
        return jax.tree.map(
            lambda *xs: np.stack([np.asarray(x) for x in xs]), *[d[k] for k in keys]
        )

    return _map_layer_lists(params, stack)


def unstack_layers(params: Mapping) -> dict:
    """A stacked layer dict -> per-layer dicts keyed by int (views of the stacked arrays)."""

    def unstack(d):
        if any(_is_layer_key(k) for k in d):
            return {int(k): v for k, v in d.items()}
        n = jax.tree.leaves(d)[0].shape[0]
        return {i: jax.tree.map(lambda x, i=i: x[i], d) for i in range(n)}

    return _map_layer_lists(params, unstack)


def _int_layer_keys(tree):
    if isinstance(tree, Mapping):
        return {(int(k) if _is_layer_key(k) else k): _int_layer_keys(v) for k, v in tree.items()}
    return tree


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
            return cfg, _int_layer_keys(params)
        params = _int_layer_keys(ckpt.restore(target))
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
