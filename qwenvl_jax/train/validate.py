"""The trainer's config checked before any work: one line per mistake, naming the key.

`train()` calls `validate(cfg, workdir=..., devices=...)` first thing, and the dry run calls it
without a workdir or devices (the slice it lays out is checked where it is chosen, `aot`), so a
value that would end in a traceback after minutes of loading (a zero division at the first log
line, `optim.lr_schedule`'s warm-up check, a mesh that does not fit, a workdir that cannot be
written) ends at start in one `ConfigError` line: the `--config.a.b` key (or `--workdir`), the
value, and what is allowed. Through the command line that is `error: ...` and exit 2
(`qwenvl_jax.cli`).

What is checked:
- `RANGES`: every numeric field's range (a key a config does not have is skipped: the stage
  files all start from `stage_config.base()`, which has them);
- cross-field rules: the warm-up ends before the schedule does, `loss_chunk` tiles
  `data.seq_len`, `optim.min_lr` <= `optim.lr`, the batch splits over the processes; with
  `devices`, the mesh fits them (a hint when a model axis cannot: `--config.mesh.model=1`, or the
  LoRA variant for the fine-tuning stage), the batch splits into micro-batches over it
  (`state.grad_accum_steps`, the rule's one owner) and `data.image_budget` over its data shards;
- with `workdir`: it is a directory this process can create a file in (gs:// is not probed:
  object stores have no directories, and a probe object would need the bucket's credentials
  before anything else does).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Sequence

import ml_collections

from qwenvl_jax import fileio
from qwenvl_jax import sharding as shd
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import model_axis


@dataclasses.dataclass(frozen=True)
class Rule:
    """The allowed values of one numeric key."""

    allowed: str  # as the message says it: "an integer >= 1"
    ok: Callable[[float], bool]
    integer: bool = False
    none_ok: bool = False  # None means "off" (optim.vit_lr_decay)
    auto_ok: bool = False  # "auto" is decided by the trainer (mesh.model: train/model_axis.py)


def _int_from(low: int, note: str = "") -> Rule:
    return Rule(f"an integer >= {low}{note}", lambda v: v >= low, integer=True)


def _number_above(low: float, note: str = "") -> Rule:
    return Rule(f"a number > {low}{note}", lambda v: v > low)


def _number_from(low: float, note: str = "") -> Rule:
    return Rule(f"a number >= {low}{note}", lambda v: v >= low)


_BETA = Rule("a number in [0, 1)", lambda v: 0 <= v < 1)
_MESH_AXIS = Rule("an integer >= 1, or -1 (the devices left)", lambda v: v >= 1 or v == -1, True)

RANGES: dict[str, Rule] = {
    "seed": _int_from(0),
    "steps": _int_from(1),
    "batch_size": _int_from(1, " (global sequences per optimizer step)"),
    "grad_accum": _int_from(1),
    "device_batch": _int_from(0, " (0: use --config.grad_accum as given)"),
    "log_every": _int_from(1),
    "pause_after_step": _int_from(0, " (0: never)"),
    "loss_chunk": _int_from(0, " (0: all positions at once)"),
    "data.seq_len": _int_from(1),
    "data.image_size": _int_from(1),
    "data.max_images": _int_from(0),
    "data.image_budget": _int_from(0, " (0: every slot)"),
    "data.worker_count": _int_from(0),
    "data.max_skip_fraction": Rule("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "data.skip_check_records": _int_from(0),
    "eval.every_steps": _int_from(1),
    "eval.batches": _int_from(1),
    "optim.lr": _number_above(0),
    "optim.min_lr": _number_from(0),
    "optim.warmup_steps": _int_from(0),
    "optim.total_steps": _int_from(1),
    "optim.b1": _BETA,
    "optim.b2": _BETA,
    "optim.eps": _number_above(0),
    "optim.weight_decay": _number_from(0),
    "optim.grad_clip": _number_from(0, " (0: no clipping)"),
    "optim.vit_lr_decay": Rule(
        "a number in (0, 1] (1: no decay)", lambda v: 0 < v <= 1, none_ok=True
    ),
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.model": Rule(
        "an integer >= 1, -1 (the devices left) or auto", _MESH_AXIS.ok, True, auto_ok=True
    ),
    "sharding.max_replicated_mb": _number_from(0),
    "checkpoint.every_steps": _int_from(1),
    "checkpoint.keep": _int_from(1),
    "checkpoint.preemption_check_every": _int_from(1),
    "model.remat_fit_gib": _number_from(0, " (0: the device's memory)"),
}

_MISSING = object()


def validate(
    cfg: ml_collections.ConfigDict,
    *,
    workdir: str | None = None,
    devices: Sequence | int | None = None,
    process_count: int | None = None,
) -> None:
    """Raises `ConfigError` (one line) on the first value of `cfg` a run cannot use.

    Args:
      cfg: a stage config (configs/*.py).
      workdir: the run's output directory: checked to be one this process can write (created
        if missing, as the run would); None skips it (the dry run).
      devices: the run's devices (or their count): the mesh and the micro-batches are checked
        against them; None skips those (the dry run checks the slice it lays out).
      process_count: the processes sharing the batch (default: `jax.process_count()`).
    """
    check_ranges(cfg)
    check_schedule(cfg)
    if process_count is None:
        import jax

        process_count = jax.process_count()
    b = int(cfg.batch_size)
    if b % process_count:
        raise ConfigError(
            f"--config.batch_size={b}: must be a multiple of the {process_count} processes"
            " (each reads batch_size / processes sequences)"
        )
    if devices is not None:
        n = devices if isinstance(devices, int) else len(devices)
        shape = dict(zip(shd.MESH_AXES, mesh_fits(cfg, n), strict=True))
        from qwenvl_jax.train.state import grad_accum_steps

        grad_accum_steps(cfg, shape)
        dp = shape["data"] * shape["fsdp"]
        budget = int(cfg.data.image_budget)
        if budget and int(cfg.data.max_images) and budget % dp:
            raise ConfigError(
                f"--config.data.image_budget={budget}: must be a multiple of the data-parallel"
                f" size data x fsdp = {dp} (each shard encodes budget / {dp} images), or 0"
            )
    if workdir is not None:
        check_workdir(workdir)


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return _MISSING
        node = node[part]
    return node


def check_ranges(cfg: ml_collections.ConfigDict) -> None:
    """Every `RANGES` key `cfg` has, and the `optim.lr_scale` multipliers."""
    for key, rule in RANGES.items():
        v = _get(cfg, key)
        if v is _MISSING or (v is None and rule.none_ok) or (v == "auto" and rule.auto_ok):
            continue
        kinds = int if rule.integer else (int, float)
        if (
            isinstance(v, bool)
            or not isinstance(v, kinds)
            or not math.isfinite(v)
            or not rule.ok(v)
        ):
            raise ConfigError(f"--config.{key}={v!r}: must be {rule.allowed}")
    scales = _get(cfg, "optim.lr_scale")
    for name, mult in scales.items() if hasattr(scales, "items") else ():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 < mult < math.inf:
            raise ConfigError(
                f"--config.optim.lr_scale.{name}={mult!r}: must be a number > 0 (to stop a"
                " group from training, list it in --config.optim.freeze)"
            )


def check_schedule(cfg: ml_collections.ConfigDict) -> None:
    """The warm-up ends before the schedule does, the loss chunks tile the sequence, and the
    learning rate's floor is not above its peak."""
    warmup, total = int(cfg.optim.warmup_steps), int(cfg.optim.total_steps)
    # optim.total_steps is a reference to steps unless a config sets it: name the one to change.
    name = "--config.steps" if total == int(cfg.steps) else "--config.optim.total_steps"
    if warmup >= total:
        raise ConfigError(
            f"--config.optim.warmup_steps={warmup}: must be < {name}={total} (the warm-up has to"
            " end before the learning-rate schedule does)"
        )
    chunk, seq_len = int(cfg.loss_chunk), int(cfg.data.seq_len)
    if 0 < chunk < seq_len and seq_len % chunk:
        raise ConfigError(
            f"--config.loss_chunk={chunk}: must divide --config.data.seq_len={seq_len} (or be 0:"
            " all positions at once)"
        )
    lr, min_lr = float(cfg.optim.lr), float(cfg.optim.min_lr)
    if min_lr > lr:
        raise ConfigError(
            f"--config.optim.min_lr={min_lr!r}: must be <= --config.optim.lr={lr!r} (the"
            " schedule decays from lr to min_lr)"
        )


def _lora_hint(cfg: ml_collections.ConfigDict) -> str:
    lora = _get(cfg, "lora.rank")
    if cfg.get("stage") == "sft" and lora is not _MISSING and not int(lora):
        return (
            ", or the LoRA variant (--config=configs/sft.py:lora), whose frozen base fits one"
            " device"
        )
    return ""


def mesh_fits(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, model) sizes of `cfg.mesh` on `num_devices` devices (`shd.mesh_shape`);
    a `ConfigError` naming the key to change when they do not fit. A model axis of "auto" is
    laid out as the first size it may take here (`model_axis.choices`)."""
    if model_axis.is_auto(cfg):  # its first size that fits the devices and the batch
        sizes = model_axis.with_model(cfg, model_axes(cfg, num_devices)[0]).mesh
    else:
        sizes = cfg.mesh
    sizes = {a: int(sizes[a]) for a in shd.MESH_AXES}
    desc = ", ".join(f"{a}={n}" for a, n in sizes.items())
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"--config.mesh: {desc}: at most one axis may be -1 (the devices left)")
    try:
        return shd.mesh_shape(sizes, num_devices)
    except ValueError:
        pass
    model = sizes["model"]
    devs = f"{num_devices} device{'s' if num_devices != 1 else ''}"
    if model > 1 and num_devices % model:
        raise ConfigError(
            f"--config.mesh.model={model}: a model axis of {model} does not fit the {devs} of"
            f" this run ({desc}); use --config.mesh.model=1{_lora_hint(cfg)}"
        )
    raise ConfigError(
        f"--config.mesh: {desc} does not fit the {devs} of this run: the product must be"
        f" {num_devices}, or one axis -1 (the devices left)"
    )


def model_axes(cfg: ml_collections.ConfigDict, num_devices: int) -> list[int]:
    """`model_axis.choices` whose micro-batches split over the data shards
    (`state.grad_accum_steps`): the sizes a model axis of "auto" may take on `num_devices`.

    Raises:
      ConfigError: none does (the first one's reason).
    """
    from qwenvl_jax.train.state import grad_accum_steps

    out, first = [], None
    for m in model_axis.choices(cfg, num_devices):
        sizes = shd.mesh_shape(model_axis.with_model(cfg, m).mesh, num_devices)
        try:
            grad_accum_steps(cfg, dict(zip(shd.MESH_AXES, sizes, strict=True)))
        except ConfigError as e:
            first = first or e
            continue
        out.append(m)
    if not out:
        raise first
    return out


def check_workdir(workdir: str) -> None:
    """`workdir` is (or can be made) a directory this process can create files in; it is not
    created here."""
    if fileio.is_remote(workdir):
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(
            f"--workdir={workdir} is a file, not a directory; give a directory (it is created if"
            " missing)"
        )
    # Nothing is created before the run starts (a run stopped by a later check leaves no
    # workdir): a missing workdir is checked through its nearest existing parent.
    probe = os.path.abspath(workdir)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(
            f"--workdir={workdir}: {probe} is a file, not a directory; give a directory (it is"
            " created if missing)"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write_check_"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir} is not writable ({e.strerror or e}); give a directory this"
            " process can create files in"
        ) from None
