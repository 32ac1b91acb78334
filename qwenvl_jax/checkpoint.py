"""Training checkpoints (Orbax): async saves, keep-last-K, resume from the latest COMPLETE step.

Layout of a training workdir:
  config.json                 the model config (HF keys), written at start
  train_config.json           the resolved training config
  checkpoints/<step>/         Orbax steps with items
      params/                 pure nested dict of the NNX Param state (layout in meta.scan_layers)
      opt_state/              the optax state's leaves, flattened in tree order (keys s00000, ...)
      meta/                   JSON: step, seed, config, scan_layers, data iterator state per process
  checkpoints_quarantine/     unreadable steps, moved aside with the reason, never reused

A step directory only appears under its final name once Orbax has finalised it, so a run killed in
the middle of a save leaves a temporary directory that is never listed. A listed step that fails to
restore (truncated or deleted files) is reported, moved to `checkpoints_quarantine/` and the
previous step is tried; if every step fails the run stops with an error rather than start over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qwenvl_jax import fileio
from qwenvl_jax import tree as tree_lib
from qwenvl_jax.errors import CheckpointError

CKPT_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints_quarantine"


def flatten_opt_state(opt_state: Any) -> dict[str, Any]:
    """The optax state's array leaves as {"s00000": leaf, ...} in tree order."""
    return {f"s{i:05d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}


def unflatten_opt_state(flat: dict[str, Any], like: Any) -> Any:
    leaves = [flat[f"s{i:05d}"] for i in range(len(flat))]
    treedef = jax.tree.structure(like)
    if treedef.num_leaves != len(leaves):
        raise ValueError(
            f"checkpoint optimizer state has {len(leaves)} leaves, this run's has "
            f"{treedef.num_leaves}: the freezing or optimizer config differs from the saved run"
        )
    return jax.tree.unflatten(treedef, leaves)


def _gather_strings(s: str) -> list[str]:
    """Every process's string, on every process (for per-host data iterator states)."""
    if jax.process_count() == 1:
        return [s]
    from jax.experimental import multihost_utils

    b = np.frombuffer(s.encode(), np.uint8)
    n = multihost_utils.process_allgather(np.array([b.size], np.int32))
    width = int(np.max(n))
    padded = np.zeros((width,), np.uint8)
    padded[: b.size] = b
    allb = multihost_utils.process_allgather(padded)
    return [bytes(allb[i][: int(n[i][0])]).decode() for i in range(jax.process_count())]


class Checkpointer:
    """Saves and restores training state in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.workdir = workdir
        self.directory = epath.Path(fileio.absolute(workdir)) / CKPT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta")
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        meta: dict,
        data_state: str | None = None,
        wait: bool = False,
    ) -> None:
        """Starts saving step `step` (async unless `wait`); every process must call this.

        Args:
            step: optimizer steps done.
            params / opt_state: global jax arrays (sharded or not).
            meta: JSON-serialisable metadata (config, seed, ...).
            data_state: this process's data iterator state as a JSON string (gathered to all).
        """
        meta = dict(meta, step=int(step))
        if data_state is not None:
            meta["data_state"] = _gather_strings(data_state)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(flatten_opt_state(opt_state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore_latest(
        self, abstract_params: Any, abstract_opt: Any | None
    ) -> tuple[int, Any, Any, dict] | None:
        """Restores the newest readable step onto the shardings of the abstract trees.

        Returns:
            (step, params, opt_state, meta) or None when there is no checkpoint at all.

        Raises:
            RuntimeError: when checkpoints exist (or were quarantined) but none can be read.
            tree_lib.TreeMismatchError: when the latest step is readable but its trees do not fit
                this run's config (other model size, freezing or optimizer); nothing is moved.
        """
        steps = self.all_steps()
        if not steps:
            qdir = epath.Path(self.workdir) / QUARANTINE_DIR
            if qdir.exists() and any(qdir.iterdir()):
                # An earlier run moved every step aside: starting over would silently discard
                # the run's progress.
                raise RuntimeError(
                    f"no checkpoint left in {self.directory}, but {qdir} holds quarantined steps"
                    f" {sorted(p.name for p in qdir.iterdir())}. Refusing to start from scratch;"
                    " restore or delete them, or use a new workdir."
                )
            return None
        errors = []
        for step in reversed(steps):
            try:
                return self._restore(step, abstract_params, abstract_opt)
            except tree_lib.TreeMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means "this step is bad"
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                errors.append((step, msg))
                logging.error(
                    "checkpoint step %d in %s is unreadable (%s); moving it to %s and falling back"
                    " to the previous step",
                    step,
                    self.directory,
                    msg,
                    QUARANTINE_DIR,
                )
                self._quarantine(step, msg)
        raise RuntimeError(
            f"no readable checkpoint in {self.directory}: {errors}. Refusing to start from scratch;"
            f" inspect {fileio.join(self.workdir, QUARANTINE_DIR)} or use a new workdir."
        )

    def _check_matches(self, step, abstract_params, abstract_opt) -> None:
        """Raises tree_lib.TreeMismatchError if the saved trees' metadata differ from this run's.

        A step whose metadata cannot be read is left to the restore (and so to quarantine)."""
        try:
            md = self.manager.item_metadata(step)
            saved = {"params": md["params"].tree, "opt_state": None}
            if abstract_opt is not None and md.get("opt_state") is not None:
                saved["opt_state"] = md["opt_state"].tree
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports it
            return
        where = f"checkpoint step {step} in {self.directory}"
        hint = (
            "the model, freezing or optimizer changed? Nothing was moved; run with the config that"
            " wrote it, or use a new workdir"
        )
        tree_lib.check_fits(
            saved["params"],
            abstract_params,
            source=f"{where}, params",
            target="this run",
            hint=hint,
        )
        if saved["opt_state"] is not None:
            tree_lib.check_fits(
                saved["opt_state"],
                flatten_opt_state(abstract_opt),
                source=f"{where}, opt_state",
                target="this run",
                hint=hint,
            )

    def _restore(self, step, abstract_params, abstract_opt):
        self._check_matches(step, abstract_params, abstract_opt)
        items = dict(
            params=ocp.args.StandardRestore(abstract_params),
            meta=ocp.args.JsonRestore(),
        )
        if abstract_opt is not None:
            items["opt_state"] = ocp.args.StandardRestore(flatten_opt_state(abstract_opt))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = out["meta"]
        if int(meta.get("step", -1)) != step:
            raise ValueError(f"meta says step {meta.get('step')}, directory says {step}")
        opt = None
        if abstract_opt is not None:
            opt = unflatten_opt_state(out["opt_state"], abstract_opt)
        return step, out["params"], opt, meta

    def _quarantine(self, step: int, reason: str) -> None:
        if jax.process_index() == 0:
            qdir = epath.Path(self.workdir) / QUARANTINE_DIR
            qdir.mkdir(parents=True, exist_ok=True)
            dest = qdir / f"{step}.{int(time.time())}"
            (self.directory / str(step)).rename(dest)
            (qdir / f"{dest.name}.reason.txt").write_text(reason + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------------ params for inference
# The two layer lists of the parameter tree. Per-layer layout: dicts keyed 0..L-1 (the HF keys
# `h.{i}`); stacked layout (scan_layers): one dict whose leaves have a leading layer axis.
LAYER_LISTS = (("transformer", "h"), ("transformer", "visual", "transformer", "resblocks"))


def _is_layer_key(k) -> bool:
    return isinstance(k, int) or (isinstance(k, str) and k.isdigit())


def _lookup(tree: Mapping, path: tuple):
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _map_layer_lists(params: Mapping, fn) -> dict:
    """Apply fn to the layer-list nodes present, copying the dicts on the way (no array copies)."""

    def rec(node, path):
        node = dict(node)
        node[path[0]] = fn(node[path[0]]) if len(path) == 1 else rec(node[path[0]], path[1:])
        return node

    out = params
    for path in LAYER_LISTS:
        if _lookup(out, path) is not None:  # a one-tower tree (stage-1 tower) lacks the other
            out = rec(out, path)
    return out


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


def int_layer_keys(tree):
    """Layer indices back to ints: Orbax restores every dict key as a string."""
    if isinstance(tree, Mapping):
        return {(int(k) if _is_layer_key(k) else k): int_layer_keys(v) for k, v in tree.items()}
    return tree


def is_workdir(path: str) -> bool:
    """Whether `path` is laid out as a training workdir (holds `checkpoints/`)."""
    return fileio.isdir(fileio.join(path, CKPT_DIR))


def _reader(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of a workdir's steps (local or gs://), without the run's devices."""
    return ocp.CheckpointManager(
        fileio.path(fileio.absolute(workdir)) / CKPT_DIR,
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
    mngr = _reader(workdir)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def _restore_numpy(mngr: ocp.CheckpointManager, step: int) -> dict:
    # Every array whole into host memory as numpy, on each process: restoring onto the saved
    # shardings would need the saving run's devices, and arrays spanning other hosts cannot be
    # fetched.
    md = mngr.item_metadata(step)["params"]
    as_numpy = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), getattr(md, "tree", md)
    )
    out = mngr.restore(
        step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(restore_args=as_numpy))
    )
    return int_layer_keys(jax.tree.map(np.asarray, out["params"]))


def _first_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def read_params(
    workdir: str, step: int | None = None, *, scan_layers: bool = False
) -> tuple[Any, dict, int]:
    """The model config and params of one complete step of a training workdir.

    Only `params` is read (numpy, whole on this host); the optimizer state is not.

    Args:
        workdir: a training workdir (config.json and checkpoints/), local or gs://.
        step: the step to read. None: the latest complete one; a step that fails to restore is
            logged and the one before it tried (nothing is moved, unlike the trainer's resume).
        scan_layers: the layout to return (stacked layers or per-layer dicts keyed by int),
            whatever the run saved.

    Returns:
        (QWenConfig, pure nested dict of numpy arrays matching `nnx.to_pure_dict` of the model,
        the step read).

    Raises:
        CheckpointError: not a workdir, no complete step, no config.json (or a bad one), no step
            `step` (the message lists those there are), or no step that can be restored.
    """
    from qwenvl_jax import config as config_lib

    if not is_workdir(workdir):
        raise CheckpointError(f"{workdir} is not a training workdir: no {CKPT_DIR}/")
    steps = workdir_steps(workdir)
    if not steps:
        raise CheckpointError(
            f"{workdir} is a training workdir without a complete checkpoint under {CKPT_DIR}/"
            " (a run that has not saved yet?)"
        )
    cfg_path = fileio.join(workdir, "config.json")
    if not fileio.isfile(cfg_path):
        raise CheckpointError(
            f"{workdir} is a training workdir without config.json (the trainer writes it at start)"
        )
    try:
        cfg = config_lib.load_hf_json(cfg_path)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    if step is not None and step not in steps:
        raise CheckpointError(f"{workdir} has no step {step}; its complete steps are {steps}")
    errors, params = [], None
    mngr = _reader(workdir)
    try:
        for s in [step] if step is not None else steps[::-1]:
            try:
                params = _restore_numpy(mngr, s)
                break
            except Exception as e:  # noqa: BLE001 - Orbax raises many types for a damaged step
                errors.append(f"step {s} ({_first_line(e)})")
                logging.error("%s: step %d cannot be restored (%s)", workdir, s, e)
    finally:
        mngr.close()
    if params is None and step is not None:
        others = [x for x in steps if x != step]
        raise CheckpointError(
            f"{workdir}: {errors[0]} cannot be restored; other complete steps: {others}"
        )
    if params is None:
        raise CheckpointError(f"{workdir}: no complete step can be restored: {'; '.join(errors)}")
    if scan_layers != is_stacked(params):
        params = stack_layers(params) if scan_layers else unstack_layers(params)
    return cfg, params, s


def latest_params(workdir: str, scan_layers: bool = False) -> tuple[Any, dict]:
    """(config, params) of a training workdir's latest readable step (`read_params`)."""
    cfg, params, _ = read_params(workdir, scan_layers=scan_layers)
    return cfg, params
