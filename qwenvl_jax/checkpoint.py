"""Training checkpoints (Orbax): async saves, keep-last-K, resume from the latest COMPLETE step.

Layout of a training workdir:
  config.json                 the model config (HF keys), written at start
  train_config.json           the resolved training config
  checkpoints/<step>/         Orbax steps with items
      params/                 pure nested dict of the NNX Param state (layout in meta.scan_layers)
      opt_state/              the optax state's leaves, flattened in tree order (keys s00000, ...)
      meta/                   JSON: step, seed, config, scan_layers, data iterator state per
                              process, and the checksum of every saved array ("checksums")
  checkpoints_quarantine/     unreadable or damaged steps, moved aside with the reason, never reused

A step directory only appears under its final name once Orbax has finalised it, so a run killed in
the middle of a save leaves a temporary directory that is never listed. A listed step that fails to
restore (truncated or deleted files) is reported, moved to `checkpoints_quarantine/` and the
previous step is tried; if every step fails the run stops with an error rather than start over.

Damage that still reads (flipped bytes inside an array file) is caught by checksums. Orbax 0.12.8
has no verification of its own for this: its zarr3 layout checksums only the shard index
(`crc32c` in `index_codecs`), the default zarr2/OCDBT layout nothing, and a changed byte restores as
a changed value. So `save` computes, on the devices and in the same jitted call that checks the
values are finite, a 64-bit checksum of every array (two position-weighted sums of its bits, modulo
2**32: exact whatever the sharding) and stores them in the step's `meta` item, which Orbax commits
with the arrays (one atomic step: no window where the arrays exist without their checksums). The
restore recomputes them on the restored arrays; a mismatch quarantines the step like an unreadable
one. Steps saved before checksums existed restore unverified, with a warning.

A tree with a non-finite floating value is never saved (`NonFiniteCheckpointError`), so keep-last-K
rotation can only ever drop a finite step for a newer finite one. A save that fails (disk full,
directory made read-only) raises `CheckpointSaveError`, one line naming the step, the path and the
OS error; the steps already complete are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qwenvl_jax import fileio
from qwenvl_jax import tree as tree_lib
from qwenvl_jax.errors import CheckpointError

CKPT_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints_quarantine"
CHECKSUM_ALGORITHM = "weighted-sums-u32x2-v1"  # the name stored with the sums; change it with them


class NonFiniteCheckpointError(CheckpointError):
    """A tree to be saved holds NaN or inf; nothing was written (the message names the array)."""


class CheckpointSaveError(CheckpointError):
    """A save failed in the file system (disk full, read-only, ...); the message names the path."""


class DamagedCheckpointError(CheckpointError):
    """A step's arrays read back, but differ from the checksums saved with them."""


class NoReadableCheckpointError(CheckpointError, RuntimeError):
    """Checkpoints exist (or were quarantined) but none can be restored; the run will not restart
    from scratch. A `RuntimeError` too, as it was before it became a one-line user error."""


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


# ------------------------------------------------------------------------------ integrity
# Odd multipliers and offsets of the two sums (any odd constants work; these are the 32-bit golden
# ratio and murmur3's mixing constants). A weight that is odd makes every single-word change move
# its sum (d * w == 0 mod 2**32 only for d == 0), and the second sum sees each word through an
# invertible xor-shift, so two words changed together must fool two unrelated sums.
_W1, _B1, _W2, _B2 = 0x9E3779B1, 0x7F4A7C15, 0x85EBCA6B, 0xC2B2AE35


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, same shape (64-bit types: a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> jax.Array:
    """uint32[3]: the checksum of one array (two words) and its count of NaN/inf values.

    The flat (C-order) index of each word is built from per-axis iotas rather than by reshaping,
    so a sharded array is summed where it lies and only the scalars are all-reduced; integer sums
    wrap exactly, so any sharding gives the same. One variadic reduction per array: separate
    reductions for the sums and the finite check compiled 2.5x slower on CPU for the tiny model.
    """
    v = _words(x)
    idx = jnp.zeros(v.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(v.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, v.shape, axis) * np.uint32(stride)
        stride = (stride * v.shape[axis]) % 2**32
    w1 = (idx * np.uint32(_W1) + np.uint32(_B1)) | np.uint32(1)
    w2 = (idx * np.uint32(_W2) + np.uint32(_B2)) | np.uint32(1)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        bad = jnp.logical_not(jnp.isfinite(x)).astype(jnp.uint32)
        if bad.shape != v.shape:  # 64-bit types: two words per value
            bad = jnp.broadcast_to(bad[..., None], v.shape)
    else:
        bad = jnp.zeros(v.shape, jnp.uint32)
    zero = np.uint32(0)
    sums = jax.lax.reduce(
        (v * w1, (v ^ (v >> 15)) * w2, bad),
        (zero, zero, zero),
        lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]),
        tuple(range(v.ndim)),
    )
    return jnp.stack(sums)


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> jax.Array:
    """uint32[n, 3]: `_leaf_sums` of n arrays, in one call."""
    if not leaves:
        return jnp.zeros((0, 3), jnp.uint32)
    return jnp.stack([_leaf_sums(x) for x in leaves])


def _host(x: jax.Array) -> np.ndarray:
    # The outputs are replicated; on several hosts they are not fully addressable, but every
    # host holds a copy.
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _fingerprints(items: dict[str, Any]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({item: {array path: checksum hex}}, ["item/path" of every array holding NaN or inf]).

    Blocks until the arrays are computed (so does Orbax's save, which copies them to the host)."""
    paths, groups = [], {}
    for item, tree in items.items():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            paths.append((item, _path_str(path)))
            # One call per set of devices: a jitted call takes arrays on one set only.
            devices = getattr(getattr(x, "sharding", None), "device_set", None)
            groups.setdefault(frozenset(devices or ()), []).append(len(paths) - 1)
    leaves = [x for tree in items.values() for x in jax.tree.leaves(tree)]
    sums = np.zeros((len(paths), 3), np.uint32)
    for idx in groups.values():
        sums[idx] = _host(_fingerprint([leaves[i] for i in idx]))
    finite = sums[:, 2] == 0
    sums = sums[:, :2]
    out: dict[str, dict[str, str]] = {item: {} for item in items}
    for (item, path), (s1, s2) in zip(paths, sums.tolist(), strict=True):
        out[item][path] = f"{s1:08x}{s2:08x}"
    bad = [
        f"{item}/{path}" for (item, path), ok in zip(paths, finite.tolist(), strict=True) if not ok
    ]
    return out, bad


_leaf_sums_jit = jax.jit(_leaf_sums)


def _host_fingerprints(items: dict[str, Any]) -> dict[str, dict[str, str]]:
    """`_fingerprints`' checksums of numpy trees, one array at a time on the CPU backend (a
    host's whole parameter set is never copied at once)."""
    # This process's own device: under jax.distributed, jax.devices() lists every process's, and
    # an array put on another process's device cannot be read back here.
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: one array at a time on the default device
        cpu = jax.local_devices()[0]
    out: dict[str, dict[str, str]] = {}
    for item, tree in items.items():
        out[item] = {}
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            s1, s2, _ = np.asarray(_leaf_sums_jit(jax.device_put(np.asarray(x), cpu))).tolist()
            out[item][_path_str(path)] = f"{s1:08x}{s2:08x}"
    return out


def verify(items: dict[str, Any], saved: dict, where: str, on_host: bool = False) -> None:
    """Checks restored arrays against the checksums saved with them.

    Args:
        items: {item name: restored tree} (only the items restored).
        saved: the `checksums` entry of the step's meta.
        where: the step's directory, for the message.
        on_host: the trees are numpy (checked one array at a time on the CPU), not jax arrays.

    Raises:
        DamagedCheckpointError: naming the item directory and the first array whose checksum
            differs, or a checksum with no array, or an array with no checksum.
    """
    if saved.get("algorithm") != CHECKSUM_ALGORITHM:
        raise DamagedCheckpointError(
            f"{where}: unknown checksum algorithm {saved.get('algorithm')!r}"
        )
    got = _host_fingerprints(items) if on_host else _fingerprints(items)[0]
    for item, sums in got.items():
        want = saved.get(item) or {}
        for path in sorted(set(sums) | set(want)):
            if sums.get(path) != want.get(path):
                why = (
                    "has no saved checksum" if path not in want
                    else "is missing" if path not in sums
                    else f"does not match its checksum ({sums[path]} != {want[path]})"
                )  # fmt: skip
                raise DamagedCheckpointError(f"{where}/{item}: array {path} {why}")


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_error(e: BaseException) -> tuple[int | None, str | None]:
    """(errno, file name) of a file-system failure: an OSError anywhere in the exception's chain,
    or TensorStore's ValueError, which carries the code in its text; (None, None) otherwise."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno, e.filename
        m = _OS_ERROR_CODE.search(str(e))
        if m:
            return int(m.group(1)), None
        e = e.__cause__ or e.__context__
    return None, None


class _QuietFileSystemErrors(logging.Filter):
    """Drops Orbax's and asyncio's own logs of a save's file-system failure (one traceback per
    array writer thread, hundreds of lines for one full disk): `Checkpointer` reports that failure
    as one CheckpointSaveError line. Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "asyncio" and "/orbax/" not in record.pathname:
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return _OS_ERROR_CODE.search(text) is None and "[Errno" not in text


_QUIET = _QuietFileSystemErrors()


def _install_quiet_logs() -> None:
    """Once per process: the log filter above on the loggers Orbax (absl) and asyncio use.

    TensorStore also prints, from its own threads and past any Python hook, an "Event loop is
    closed" traceback for each write still in flight when a save's first write failed; those
    remain, before the one line."""
    for name in ("absl", "asyncio"):
        if _QUIET not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_QUIET)


class Checkpointer:
    """Saves and restores training state in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.workdir = workdir
        self.directory = epath.Path(fileio.absolute(workdir)) / CKPT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # The step's directories are made in the caller's thread. Made in the background
            # (Orbax's default), a failure (read-only directory) leaves every array's writer
            # thread waiting for a "directory created" signal that never comes, for Orbax's
            # 300 s coordination timeout each, so the process could not exit.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta")
        )
        _install_quiet_logs()
        self._pending: int | None = None  # the step whose async save may still be running
        self._failed = False  # a save failed and was reported: close() must not wait on it

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
        check_finite: bool = True,
    ) -> None:
        """Starts saving step `step` (async unless `wait`); every process must call this.

        Waits for the step's arrays to be computed (as Orbax's copy to the host does anyway) to
        checksum them and check them finite, in one jitted call; the writing stays async.

        Args:
            step: optimizer steps done.
            params / opt_state: global jax arrays (sharded or not).
            meta: JSON-serialisable metadata (config, seed, ...).
            data_state: this process's data iterator state as a JSON string (gathered to all).
            wait: return only when the step is complete on disk.
            check_finite: refuse a tree with NaN or inf in a floating array.

        Raises:
            NonFiniteCheckpointError: `check_finite` and some array is not finite; nothing is
                written, the steps on disk stay as they are.
            CheckpointSaveError: this save, or the previous async one, failed in the file system.
        """
        flat_opt = flatten_opt_state(opt_state)
        sums, bad = _fingerprints({"params": params, "opt_state": flat_opt})
        if check_finite and bad:
            last = self.all_steps()
            raise NonFiniteCheckpointError(
                f"not saving step {step}: {bad[0]} holds NaN or inf"
                + (f" ({len(bad)} arrays do)" if len(bad) > 1 else "")
                + f"; the newest checkpoint in {self.directory} is still "
                + (f"step {last[-1]}" if last else "none")
            )
        meta = dict(meta, step=int(step), checksums=dict(sums, algorithm=CHECKSUM_ALGORITHM))
        if data_state is not None:
            meta["data_state"] = _gather_strings(data_state)
        # Orbax's save waits for the previous one anyway; waiting here names its step if it failed.
        self.wait()
        self._pending = step
        with self._reporting():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(flat_opt),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        if wait:
            self.wait()

    @contextlib.contextmanager
    def _reporting(self):
        """Turns a file-system failure of the pending save (`self._pending`) into one
        CheckpointSaveError line naming the step, the path, the OS error and the intact step."""
        try:
            yield
        except Exception as e:
            code, fname = _os_error(e)
            if code is None:
                raise
            self._failed = True
            failed, self._pending = self._pending, None
            what = os.strerror(code) if code in errno.errorcode else f"OS error {code}"
            done = [s for s in self._complete_steps() if s != failed]
            kept = f"step {done[-1]} is intact" if done else "no earlier step exists"
            raise CheckpointSaveError(
                f"could not save checkpoint step {failed}: {fname or self.directory}: {what}"
                f" [errno {code}]; {kept} in {self.directory}"
            ) from e

    def _complete_steps(self) -> list[int]:
        try:
            self.manager.reload()
            return self.all_steps()
        except Exception:  # noqa: BLE001 - only for the message
            return []

    def restore_latest(
        self, abstract_params: Any, abstract_opt: Any | None
    ) -> tuple[int, Any, Any, dict] | None:
        """Restores the newest intact step onto the shardings of the abstract trees.

        A step that cannot be read, or whose arrays differ from the checksums saved with them,
        is moved to `checkpoints_quarantine/` (with the reason) and the one before it is tried;
        one line per such step says which, why, and the step the run resumes from.

        Returns:
            (step, params, opt_state, meta) or None when there is no checkpoint at all.

        Raises:
            NoReadableCheckpointError: when checkpoints exist (or were quarantined) but none can
                be read.
            tree_lib.TreeMismatchError: when the latest step is readable but its trees do not fit
                this run's config (other model size, freezing or optimizer); nothing is moved.
        """
        steps = self.all_steps()
        if not steps:
            qdir = epath.Path(self.workdir) / QUARANTINE_DIR
            if qdir.exists() and any(qdir.iterdir()):
                # An earlier run moved every step aside: starting over would silently discard
                # the run's progress.
                raise NoReadableCheckpointError(
                    f"no checkpoint left in {self.directory}, but {qdir} holds quarantined steps"
                    f" {sorted(p.name for p in qdir.iterdir())}. Refusing to start from scratch;"
                    " restore or delete them, or use a new workdir."
                )
            return None
        errors = []
        for step in reversed(steps):
            try:
                out = self._restore(step, abstract_params, abstract_opt)
            except (tree_lib.TreeMismatchError, _CannotVerify):
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means "this step is bad"
                state = "damaged" if isinstance(e, DamagedCheckpointError) else "unreadable"
                msg = _first_line(e)
                dest = self._quarantine(step, msg)
                errors.append((step, state, msg, dest))
                continue
            for bad, state, msg, dest in errors:
                logging.error(
                    "checkpoint step %d in %s is %s (%s); moved it to %s; resuming from step %d",
                    bad, self.directory, state, msg, dest, step,
                )  # fmt: skip
            return out
        for bad, state, msg, dest in errors:
            logging.error(
                "checkpoint step %d in %s is %s (%s); moved it to %s", bad, self.directory, state,
                msg, dest,
            )  # fmt: skip
        listed = "; ".join(f"step {b} {st} ({m})" for b, st, m, _ in errors)
        raise NoReadableCheckpointError(
            f"no readable checkpoint in {self.directory}: {listed}. Refusing to start from scratch;"
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
        restored = {"params": out["params"]}
        if abstract_opt is not None:
            restored["opt_state"] = out["opt_state"]
        _verify_or_warn(restored, meta, step, self.directory)
        opt = None
        if abstract_opt is not None:
            opt = unflatten_opt_state(out["opt_state"], abstract_opt)
        return step, out["params"], opt, meta

    def _quarantine(self, step: int, reason: str) -> str:
        """Moves a step aside with its reason; returns where it went."""
        qdir = epath.Path(self.workdir) / QUARANTINE_DIR
        dest = qdir / f"{step}.{int(time.time())}"
        if jax.process_index() == 0:
            qdir.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(dest)
            (qdir / f"{dest.name}.reason.txt").write_text(reason + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.manager.reload()
        return str(dest)

    def wait(self) -> None:
        """Waits for the pending async save.

        Raises:
            CheckpointSaveError: it failed in the file system."""
        if self._pending is None:
            return
        with self._reporting():
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Waits for the pending save and releases Orbax's threads.

        After a failure already reported, nothing is waited for (and nothing raised again).

        Raises:
            CheckpointSaveError: the pending save failed in the file system."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - the failure was reported already
                if not self._failed:
                    raise
                logging.debug("closing the checkpoint manager after a failed save: %s", e)


def _verify_or_warn(restored: dict, meta: dict, step: int, directory, on_host=False) -> None:
    """Checks restored arrays against the step's checksums; a step saved before checksums
    existed restores with a warning."""
    where = f"{directory}/{step}"
    if "checksums" not in meta:
        logging.warning(
            "checkpoint step %d in %s has no checksums (saved by an older version): restored"
            " without verifying its arrays",
            step,
            directory,
        )
        return
    try:
        verify(restored, meta["checksums"], where, on_host=on_host)
    except DamagedCheckpointError:
        raise
    except Exception as e:
        # Computing the checksums failed: no evidence against the step, which must not be
        # quarantined for it.
        raise _CannotVerify(f"{where}: could not compute the checksums: {_first_line(e)}") from e


class _CannotVerify(RuntimeError):
    """Checksums could not be computed (our failure, not the step's)."""


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
        step,
        args=ocp.args.Composite(
            params=ocp.args.PyTreeRestore(restore_args=as_numpy), meta=ocp.args.JsonRestore()
        ),
    )
    params = jax.tree.map(np.asarray, out["params"])
    _verify_or_warn({"params": params}, out["meta"], step, mngr.directory, on_host=True)
    return int_layer_keys(params)


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
        step: the step to read. None: the latest complete one; a step that fails to restore (or
            to match its checksums) is logged and the one before it tried (nothing is moved, unlike
            the trainer's resume).
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
            except _CannotVerify:
                raise  # our failure, not the step's: no reason to read an older one
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
