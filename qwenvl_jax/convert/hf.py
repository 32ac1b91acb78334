"""Import an HF Qwen-VL checkpoint into our NNX parameter tree, and export ours to HF format.

The parameter tree is a pure nested dict (what `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
gives): string keys, integer keys for the layer lists `transformer.h` and
`transformer.visual.transformer.resblocks` when `scan_layers=False`, or one stacked dict with a
leading layer axis when `scan_layers=True`. Neither direction needs torch.

Import streams the files shard by shard and tensor by tensor (one tensor is read and converted at a
time), so the host holds about one copy of the weights; export holds one shard at a time. Every
key of the checkpoint must be consumed exactly once: a missing, unexpected, duplicated or
mis-shaped key, or an unsupported dtype, raises `StateDictMismatchError` /
`UnsupportedDtypeError` naming it. Export first checks that our tree fits the config
(`check_params`, which raises `qwenvl_jax.tree.TreeMismatchError`).
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from qwenvl_jax import config as config_lib
from qwenvl_jax import fileio
from qwenvl_jax import tree as tree_lib
from qwenvl_jax.config import QWenConfig
from qwenvl_jax.convert import mapping, tensor_io
from qwenvl_jax.convert.errors import CheckpointError, StateDictMismatchError
from qwenvl_jax.errors import MissingPathError

Progress = Callable[[str], None] | None

# generation_config.json of the published Qwen-VL-Chat (spec 7.2).
GENERATION_CONFIG = {
    "chat_format": "chatml",
    "do_sample": True,
    "eos_token_id": 151643,
    "max_new_tokens": 512,
    "max_window_size": 6144,
    "pad_token_id": 151643,
    "top_k": 0,
    "top_p": 0.3,
    "transformers_version": "4.31.0",
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


# ----------------------------------------------------------------------------- files
def checkpoint_files(path: str) -> list[str]:
    """The weight files of an HF checkpoint directory (or a single file), in load order.

    Prefers safetensors over `.bin` when both are present. With an index json, its shards are used
    (and must exist); without one, `model*.safetensors` or `pytorch_model*.bin` are globbed.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MissingPathError(f"no checkpoint at {path}")
    for index_name, pattern in (
        (SAFETENSORS_INDEX, "model*.safetensors"),
        (BIN_INDEX, "pytorch_model*.bin"),
    ):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise MissingPathError(f"{index} names shards that do not exist: {missing}")
            return [os.path.join(path, f) for f in files]
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if found:
            return found
    raise MissingPathError(
        f"{path} holds no Qwen-VL weights: expected {SAFETENSORS_INDEX}, {BIN_INDEX},"
        " model*.safetensors or pytorch_model*.bin"
    )


def read_config(path: str) -> QWenConfig:
    """The config of a checkpoint directory (its config.json).

    Raises:
      MissingPathError (a FileNotFoundError): nothing at `path`.
      CheckpointError: `path` is a file, or its config.json is missing, not JSON, not a Qwen-VL
        config or has a field outside `config.BOUNDS` (the message names the file and the field;
        checked before anything is allocated from the config).
    """
    if not fileio.exists(path):
        raise MissingPathError(f"no checkpoint at {path}: it does not exist")
    if not fileio.isdir(path):
        raise CheckpointError(
            f"{path} is a file, not a checkpoint directory: a single weight file has no"
            " config.json (pass the directory, or from Python config=QWenConfig(...))"
        )
    cfg_path = fileio.join(path, "config.json")
    if not fileio.isfile(cfg_path):
        raise CheckpointError(
            f"{path} has no config.json (an HF checkpoint directory holds config.json and the"
            " weight shards)"
        )
    try:
        return config_lib.load_hf_json(path)
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e)
        raise CheckpointError(msg if cfg_path in msg else f"{cfg_path}: {msg}") from None


def iter_file(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) of one weight file, one tensor at a time."""
    if path.endswith(".safetensors"):
        return tensor_io.iter_safetensors(path)
    if path.endswith(".bin") or path.endswith(".pt") or path.endswith(".pth"):
        return tensor_io.iter_torch_bin(path)
    raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


# ----------------------------------------------------------------------------- import
def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def import_tensors(
    tensors: Iterable[tuple[str, np.ndarray, str]],
    cfg: QWenConfig,
    *,
    scan_layers: bool = False,
    dtype: Any = None,
    only: Callable[[mapping.Rule], bool] | None = None,
) -> dict:
    """Map (hf_key, array, source) triples onto our parameter tree.

    Args:
      tensors: HF-layout arrays with the name of the file each came from (for messages).
      cfg: the model config the checkpoint must match.
      scan_layers: build the stacked-layer layout instead of per-layer dicts.
      dtype: cast every tensor to this dtype (e.g. jnp.float32); None keeps the file's dtype.
      only: keep only the rules it accepts (a partial tree, e.g. one tower); None keeps all.

    Returns:
      the pure nested dict of numpy arrays.

    Raises:
      StateDictMismatchError: unexpected, duplicated, missing or mis-shaped keys (all listed).
    """
    by_key = {r.hf_key: r for r in mapping.rules(cfg) if only is None or only(r)}
    counts = mapping.layer_counts(cfg)
    seen: dict[str, str] = {}
    problems: list[str] = []
    tree: dict = {}
    stacks: dict[tuple, np.ndarray] = {}
    for key, arr, source in tensors:
        if key.endswith(mapping.IGNORED_HF_SUFFIXES):
            continue  # non-parameter buffers the reference also ignores on load
        rule = by_key.get(key)
        if rule is None:
            problems.append(f"unexpected key {key!r} in {source}")
            continue
        if key in seen:
            problems.append(f"key {key!r} appears twice: in {seen[key]} and {source}")
            continue
        seen[key] = source
        if tuple(arr.shape) != rule.hf_shape:
            problems.append(
                f"key {key!r} in {source} has shape {tuple(arr.shape)}; the config expects"
                f" {rule.hf_shape}"
            )
            continue
        out = rule.to_ours(arr)
        out = np.array(out, dtype=dtype if dtype is not None else out.dtype)  # own the memory
        if rule.layer is None or not scan_layers:
            _set(tree, rule.path(scan_layers), out)
            continue
        path = rule.path(True)
        if path not in stacks:
            stacks[path] = np.empty((counts[rule.prefix],) + out.shape, out.dtype)
            _set(tree, path, stacks[path])
        if stacks[path].dtype != out.dtype:
            problems.append(f"key {key!r} in {source} has dtype {out.dtype}; layer 0 had another")
            continue
        stacks[path][rule.layer] = out
    missing = [k for k in by_key if k not in seen]
    problems += [f"missing key {k!r} (shape {by_key[k].hf_shape})" for k in missing]
    if problems:
        shown = "\n  ".join(problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise StateDictMismatchError(
            f"checkpoint does not match the config ({len(problems)} problem"
            f"{'s' * (len(problems) > 1)}):\n  {shown}{more}"
        )
    return tree


def import_hf(
    path: str,
    *,
    config: QWenConfig | None = None,
    scan_layers: bool = False,
    dtype: Any = None,
    progress: Progress = None,
    only: Callable[[mapping.Rule], bool] | None = None,
) -> tuple[QWenConfig, dict]:
    """Read an HF Qwen-VL checkpoint (directory or single weight file) into our parameter tree.

    Args:
      path: a directory with config.json and safetensors / .bin shards (with or without an index),
        or one weight file (then `config` is required).
      config: the config to check against; default: the directory's config.json.
      scan_layers: return the stacked-layer layout.
      dtype: cast to this dtype; None keeps the stored dtype (bf16 for the published weights).
      progress: called with one line per shard.
      only: keep only the rules it accepts (see `import_tensors`).

    Returns:
      (config, pure nested dict of numpy arrays).

    Raises:
      MissingPathError (a FileNotFoundError): no checkpoint, or no weight shards, at `path`.
      CheckpointError: a bad config.json or weight file, or keys that do not match (named).
    """
    if config is None:
        config = read_config(path)
    files = checkpoint_files(path)

    def stream():
        for n, f in enumerate(files):
            t0, nbytes, count = time.time(), 0, 0
            for key, arr in iter_file(f):
                nbytes += arr.nbytes
                count += 1
                yield key, arr, os.path.basename(f)
            if progress:
                progress(
                    f"[{n + 1}/{len(files)}] {os.path.basename(f)}: {count} tensors,"
                    f" {nbytes / 2**20:.1f} MiB, {time.time() - t0:.1f} s"
                )

    return config, import_tensors(stream(), config, scan_layers=scan_layers, dtype=dtype, only=only)


# ----------------------------------------------------------------------------- export
def _as_pure_dict(params: Any) -> Mapping:
    """Accept a pure dict, an nnx.State or a model; return the pure nested dict of Params."""
    from flax import nnx

    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return params


def _get(tree: Mapping, path: tuple):
    node = tree
    for k in path:
        try:
            node = node[k]
        except (KeyError, TypeError, IndexError):
            # `check_params` runs first and names every missing path; this is its safety net.
            missing = ".".join(map(str, path))
            raise tree_lib.TreeMismatchError(
                f"parameters: does not fit the config: 1 missing (first {missing})",
                source="parameters",
                missing=[missing],
            ) from None
    return node


def is_scanned(params: Mapping) -> bool:
    """Whether the tree holds stacked layers (no integer keys under transformer.h)."""
    h = params.get("transformer", {}).get("h", {})  # absent: `check_params` names it
    return not any(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in h)


def _leaf(params: Mapping, rule: mapping.Rule, scanned: bool) -> np.ndarray:
    if rule.layer is None or not scanned:
        path = rule.path(False)
        try:
            x = _get(params, path)
        except tree_lib.TreeMismatchError:
            if rule.layer is None:
                raise
            # Orbax may have turned integer layer keys into strings.
            x = _get(params, rule.prefix + (str(rule.layer),) + rule.rest)
    else:
        x = _get(params, rule.path(True))[rule.layer]
    return np.asarray(x)  # its shape was checked by `check_params`


def hf_tensors(
    params: Any, cfg: QWenConfig, *, dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_key, HF-layout array) for every tensor, in state_dict order, one at a time.

    Raises:
      TreeMismatchError: a parameter is missing or mis-shaped, or the tree holds parameters the
        config does not have.
    """
    params = _as_pure_dict(params)
    check_params(params, cfg)
    scanned = is_scanned(params)
    for rule in mapping.rules(cfg):
        x = rule.to_hf(_leaf(params, rule, scanned))
        yield rule.hf_key, np.asarray(x, dtype=dtype or x.dtype, order="C")


def export_hf(
    params: Any,
    cfg: QWenConfig,
    out_dir: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 2 * 2**30,
    tokenizer: Any = "default",
    progress: Progress = None,
) -> list[str]:
    """Write an HF Qwen-VL directory that the published PyTorch code loads.

    Files: `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`,
    `config.json` (with the release's auto_map), `generation_config.json` (Qwen-VL-Chat's values),
    `qwen.tiktoken` and `tokenizer_config.json`. The published `*.py` files are not included:
    to load with `trust_remote_code`, put them next to these files.

    Args:
      params: our parameter tree (pure dict, nnx.State or model), either layer layout.
      cfg: its config.
      out_dir: created if needed; local or `gs://` (each file is written in a local scratch
        directory and uploaded at once, so the scratch holds at most one shard).
      dtype: cast on export (e.g. ml_dtypes.bfloat16); None keeps each parameter's dtype.
      max_shard_bytes: start a new shard when the next tensor would pass this size.
      tokenizer: an object with `save_vocabulary(dir)`; "default" is the published vocabulary;
        None writes no tokenizer files.
      progress: called with one line per shard.

    Returns:
      the paths written.
    """
    args = dict(dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)
    if not fileio.is_remote(out_dir):
        return _export_hf(params, cfg, out_dir, progress=progress, **args)
    with tempfile.TemporaryDirectory(prefix="qwenvl_export_") as stage:

        def upload(local: str) -> str:
            remote = fileio.join(out_dir, os.path.basename(local))
            fileio.copy_file(local, remote)
            os.remove(local)
            return remote

        return _export_hf(params, cfg, stage, progress=progress, done=upload, **args)


def _export_hf(params, cfg, out_dir, *, dtype, max_shard_bytes, tokenizer, progress, done=None):
    """`export_hf` into a local `out_dir`; `done(path)` takes each file once it is written."""
    done = done or (lambda p: p)
    params = _as_pure_dict(params)
    check_params(params, cfg)  # before any file is written
    scanned = is_scanned(params)
    rules = mapping.rules(cfg)
    os.makedirs(out_dir, exist_ok=True)
    # Plan the shards from shapes and dtypes only (nothing is materialised yet).
    specs = []
    for r in rules:
        leaf = _get_leaf_meta(params, r, scanned)
        dt = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)
        specs.append((r, dt, int(np.prod(r.hf_shape, dtype=np.int64)) * dt.itemsize))
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec[2]
    n = len(shards)
    weight_map, written, total = {}, [], 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        t0 = time.time()
        # One shard in memory at a time (at most one converted copy of each of its tensors).
        tensors = {
            r.hf_key: np.asarray(r.to_hf(_leaf(params, r, scanned)), dtype=dt, order="C")
            for r, dt, _ in shard
        }
        nbytes = tensor_io.save_safetensors(
            os.path.join(out_dir, name), tensors, metadata={"format": "pt"}
        )
        del tensors
        weight_map.update({r.hf_key: name for r, _, _ in shard})
        total += nbytes
        written.append(done(os.path.join(out_dir, name)))
        if progress:
            progress(
                f"[{i + 1}/{n}] {name}: {len(shard)} tensors, {nbytes / 2**20:.1f} MiB,"
                f" {time.time() - t0:.1f} s"
            )
    index = os.path.join(out_dir, SAFETENSORS_INDEX)
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    written.append(done(index))
    cfg.save_hf_json(out_dir)
    written.append(done(os.path.join(out_dir, "config.json")))
    gen = os.path.join(out_dir, "generation_config.json")
    with open(gen, "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
        f.write("\n")
    written.append(done(gen))
    if tokenizer is not None:
        if isinstance(tokenizer, str) and tokenizer == "default":
            from qwenvl_jax.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        written += [done(f) for f in tokenizer.save_vocabulary(out_dir)]
    return written


def check_params(params: Any, cfg: QWenConfig, *, source: str = "parameters") -> None:
    """Check a parameter tree (arrays or jax.ShapeDtypeStruct) against the config, reading nothing.

    Either layer layout fits (stacked when `transformer.h` has no integer keys); Orbax's string
    layer keys ("0") name the same paths as integer ones.

    Args:
      params: a pure dict, an nnx.State or a model.
      cfg: the config it must fit.
      source: where the tree came from, for the message.

    Raises:
      TreeMismatchError: a missing, unexpected or mis-shaped parameter (the first of each named).
    """
    import jax

    params = _as_pure_dict(params)
    scanned = is_scanned(params)
    counts = mapping.layer_counts(cfg)
    want = {}
    for r in mapping.rules(cfg):
        shape = (counts[r.prefix],) + r.shape if (scanned and r.layer is not None) else r.shape
        want[".".join(map(str, r.path(scanned)))] = jax.ShapeDtypeStruct(shape, np.float32)
    tree_lib.check_fits(params, want, source=source, target="the config")


def _get_leaf_meta(params: Mapping, rule: mapping.Rule, scanned: bool):
    """The leaf (not converted) for its dtype; shapes are checked when it is written."""
    if rule.layer is None or not scanned:
        try:
            return _get(params, rule.path(False))
        except tree_lib.TreeMismatchError:
            if rule.layer is None:
                raise
            return _get(params, rule.prefix + (str(rule.layer),) + rule.rest)
    return _get(params, rule.path(True))
