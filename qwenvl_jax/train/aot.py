"""Dry run: resolved config, mesh and per-device bytes; ahead-of-time compiles for TPU slices.

Three kinds, by the config: `aot.topology` set (and the `tpu` extra): compile the real step for that
TPU slice on this CPU host. Else `aot.slice` names a slice (`SLICES`: "v5p-64", "8xh100", "8"):
lay the mesh and the shardings out over that many devices abstractly (a `jax.sharding.AbstractMesh`,
nothing compiled, no device needed) and print per-device bytes and how to compile for it. Else
("local"): this machine's devices."""

from __future__ import annotations

import dataclasses
import re
import shlex
import time

import jax
import ml_collections

from qwenvl_jax import flops as flops_lib
from qwenvl_jax import sharding as shd
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import inputs, model_axis
from qwenvl_jax.train import remat as remat_lib
from qwenvl_jax.train.state import build, check_setup, describe, step_model_flops
from qwenvl_jax.train.step import aot_compile, compiled_report  # noqa: F401 (aot's API too)
from qwenvl_jax.train.validate import validate

_COLLECTIVE = re.compile(
    r" (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\s*$", re.M)
_ASYNC_CALLER = re.compile(r"^\s*%async[\w.\-]* = [^\n]*$", re.M)
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")


def program_summary(hlo_text: str) -> dict:
    """What the compiled program does, read from its HLO text: Pallas kernel calls (TPU custom
    calls; whether the splash attention kernel is among them) and collectives, counted as
    asynchronous (a `*-start` op, or inside a computation reached from an async collective
    fusion or an `async-collective-start/done` op) or synchronous (everything else).
    Hand-written: XLA exposes no API for it."""
    spans = [(m.start(), m.group(1)) for m in _COMPUTATION.finditer(hlo_text)]
    bodies = {
        name: hlo_text[start : (spans[i + 1][0] if i + 1 < len(spans) else len(hlo_text))]
        for i, (start, name) in enumerate(spans)
    }
    in_async = set()
    todo = [n for n in bodies if n.startswith("async_collective_fusion")]
    for line in _ASYNC_CALLER.findall(hlo_text):  # %async-collective-start.3 = ... calls=%f
        todo.extend(_CALLS.findall(line))
    while todo:
        name = todo.pop()
        if name in in_async or name not in bodies:
            continue
        in_async.add(name)
        todo.extend(_CALLS.findall(bodies[name]))
    counts = {"async": 0, "sync": 0}
    by_op: dict[str, dict[str, int]] = {}
    for name, body in bodies.items():
        for op, start in _COLLECTIVE.findall(body):
            kind = "async" if (start or name in in_async) else "sync"
            counts[kind] += 1
            by_op.setdefault(op, {"async": 0, "sync": 0})[kind] += 1
    return {
        "pallas_calls": hlo_text.count("tpu_custom_call"),
        "splash_attention": "splash" in hlo_text,
        "collectives_async": counts["async"],
        "collectives_sync": counts["sync"],
        "collectives_by_op": by_op,
    }


def topology_devices(cfg) -> list | None:
    if not cfg.aot.get("topology"):
        return None
    from jax.experimental import topologies

    from qwenvl_jax import compiler

    # The TPU compiler reads its flags when libtpu starts, here; JAX_PLATFORMS=cpu hides the
    # platform from the trainer's own apply_flags, so the slice's flags are set now.
    compiler.apply_flags(platforms={"tpu"})
    bounds = tuple(int(x) for x in str(cfg.aot.chips_per_host).split(","))
    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name=cfg.aot.topology,
        chip_config_name=cfg.aot.chip_config or "default",
        chips_per_host_bounds=bounds,
        num_slices=1,
    )
    return list(topo.devices)


@dataclasses.dataclass(frozen=True)
class Slice:
    """Devices a dry run lays the mesh out on without having them.

    Attributes:
      name: as given (`config.aot.slice`). devices: JAX devices (a v4/v5p chip is one device).
      chip: its `flops.CHIP_HBM_BYTES` key, if known. topology, chip_config: the
        `config.aot.topology` / `chip_config` that compile for it (the TPU slices of
        launch/README.md).
    """

    name: str
    devices: int
    chip: str | None = None
    topology: str = ""
    chip_config: str = ""


# The TPU slices launch/README.md compiles for: name -> (aot.topology, aot.chip_config).
TOPOLOGIES = {
    "v5p-8": ("v5p:2x2x1", "megacore"),
    "v5p-64": ("v5p:4x4x2", "megacore"),
    "v6e-64": ("v6e:8x8", "default"),
}
# A TPU slice's name counts TensorCores on v4/v5p (two per chip, one JAX device per chip:
# megacore) and chips on v5e/v6e.
_CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}
_TPU = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")
_GPUS = re.compile(r"^(\d+)x(h100|h200)$")
SLICE_FORMS = "local, a TPU slice (v5p-64, v6e-64, v5e-16, v4-32), GPUs (8xh100) or a count (8)"


def parse_slice(name: str) -> Slice:
    """`config.aot.slice` (not "local") as a `Slice`.

    Raises:
      ConfigError: a name of none of the `SLICE_FORMS`.
    """
    key = str(name).strip().lower()
    if key.isdigit() and int(key) > 0:
        return Slice(key, int(key))
    if m := _TPU.match(key):
        per, cores = _CORES_PER_DEVICE[m[1]], int(m[2])
        if cores >= per and cores % per == 0:
            chip = "v5e" if m[1] == "v5litepod" else m[1]
            return Slice(key, cores // per, chip, *TOPOLOGIES.get(key, ("", "")))
    if m := _GPUS.match(key):
        if int(m[1]) > 0:
            return Slice(key, int(m[1]), m[2])
    raise ConfigError(f"config.aot.slice={name!r}: give {SLICE_FORMS}")


def dry_run(cfg: ml_collections.ConfigDict, command: str | None = None) -> dict:
    """Prints config, mesh and per-device bytes; compiles AOT for config.aot.topology if set, else
    lays the mesh out for config.aot.slice (`slice_dry_run`) unless that is "local".
    Needs no data: with none given it says what a real run needs.

    Args:
      cfg: the training config.
      command: the command line that asked for it (repeated in the how-to-compile line).
    """
    validate(cfg)  # the mesh is checked below, against the devices it is laid out for
    print(inputs.describe(cfg, dry_run=True))
    print(cfg)
    devices = topology_devices(cfg)
    if devices is None and cfg.aot.slice != "local":
        return slice_dry_run(cfg, parse_slice(cfg.aot.slice), command)
    if devices is None:
        try:
            shd.mesh_shape(model_axis.mesh_sizes(cfg, jax.device_count()), jax.device_count())
        except ValueError as e:
            raise ConfigError(
                f"config.mesh on this machine (config.aot.slice=local): {e}; name a slice to lay"
                f" it out for instead: --config.aot.slice=v5p-64 ({SLICE_FORMS})"
            ) from None
    t0 = time.time()
    s, compiled = remat_lib.resolve(cfg, devices)  # "auto" remat compiles to choose
    print(describe(s))
    check_setup(s)
    out = {"mesh": dict(s.mesh.shape)}
    out["param_bytes"] = shd.device_bytes(s.abstract_params, s.param_sharding)
    out["opt_bytes"] = shd.device_bytes(s.abstract_opt, s.opt_sharding)
    if devices is not None:
        compiled = compiled or aot_compile(s)
        rep = compiled_report(compiled)
        program = program_summary(compiled.as_text())
        out.update(rep)
        out["program"] = program
        print(
            f"AOT compile for {cfg.aot.topology} ({len(devices)} chips) in {time.time() - t0:.0f}s"
        )
        for k, v in rep.items():
            print(f"  {k}: {v / 2**30:.3f} GiB" if k.endswith("bytes") else f"  {k}: {v:.4g}")
        print(
            f"  Pallas kernels: {program['pallas_calls']} calls"
            f" (splash attention: {'yes' if program['splash_attention'] else 'no'});"
            f" collectives: {program['collectives_async']} async,"
            f" {program['collectives_sync']} sync {program['collectives_by_op']}"
        )
        n = len(devices)
        print(
            f"  model FLOPs per device per step: {step_model_flops(s) / n / 1e12:.2f} TFLOP"
            f" ({step_model_flops(s) / n / s.accum / 1e12:.2f} per micro-batch)"
        )
    print(work_line(s))
    return out


def slice_dry_run(cfg: ml_collections.ConfigDict, sl: Slice, command: str | None = None) -> dict:
    """The mesh, parameter count and per-device bytes of params and optimizer state for `cfg` on
    the slice `sl`, from abstract shapes over an `AbstractMesh` of its size: nothing compiled or
    allocated, no device needed. Ends with the command that compiles for it."""
    try:
        shape = shd.mesh_shape(model_axis.mesh_sizes(cfg, sl.devices), sl.devices)
    except ValueError as e:
        raise ConfigError(
            f"config.mesh on config.aot.slice={sl.name} ({sl.devices} devices): {e}"
        ) from None
    mesh = jax.sharding.AbstractMesh(
        shape, shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
    )
    s = build(cfg, mesh)
    chip = f" ({sl.chip})" if sl.chip else ""
    print(f"dry run for {sl.name}: {sl.devices} device{'s' if sl.devices > 1 else ''}{chip}")
    print(describe(s))
    try:
        check_setup(s)
    except ValueError as e:  # a large parameter left replicated: the config's rules, named
        raise ConfigError(f"config.aot.slice={sl.name}: {e}") from None
    out = {"slice": sl.name, "devices": sl.devices, "mesh": dict(mesh.shape)}
    out["param_bytes"] = shd.device_bytes(s.abstract_params, s.param_sharding)
    out["opt_bytes"] = shd.device_bytes(s.abstract_opt, s.opt_sharding)
    hbm = flops_lib.CHIP_HBM_BYTES.get(sl.chip or "")
    if hbm:
        held = out["param_bytes"] + out["opt_bytes"]
        print(
            f"params + optimizer state: {held / 2**30:.2f} GiB of the {sl.chip}'s"
            f" {hbm / 2**30:.1f} GiB per device; activations and temporaries come on top (the"
            " compile below measures the peak)"
        )
    autos = remat_lib.auto_towers(cfg)
    if autos:
        print(
            f"{', '.join(f'config.model.{k}' for k in autos)}=auto: chosen by compiling (laid out"
            f" here with {remat_lib.LADDER[0]})"
        )
    if model_axis.is_auto(cfg):
        print(
            f"config.mesh.model=auto: chosen by compiling, 1 where the step fits with a remat"
            f" policy no heavier than model = 2's (laid out here with {shape[2]})"
        )
    print(work_line(s))
    print(f"compile for it: {compile_hint(cfg, sl, command)}")
    return out


def work_line(s, rows: int = 8) -> str:
    """One line: the model FLOPs per step counting only real work (non-padding tokens, attention
    within samples, valid images), against those counting every slot and position, at the
    packing of `rows` rows of the run's data packed here (its synthetic rows with
    `data.kind=random`), scaled to the batch."""
    from qwenvl_jax.data.batch import real_work

    full = step_model_flops(s)
    line = "model FLOPs per step counting only real work"
    kind, spec = inputs.train_spec(s.cfg)
    if kind == "pipeline" and spec is None:
        return f"{line}: give data to see them at the data's packing"
    rows = min(rows, int(s.cfg.batch_size))
    it = inputs.make_data_iterator(s.cfg, s.mcfg, rows)
    try:
        w = real_work(next(it))
    finally:
        if hasattr(it, "close"):
            it.close()
    scale = int(s.cfg.batch_size) / rows
    real = step_model_flops(s, work={k: v * scale for k, v in w.items()})
    what = "random tokens" if kind == "random" else "the data"
    return (
        f"{line} (non-padding tokens, attention within samples, valid images): {real / 1e12:.2f}"
        f" TFLOP, {real / full:.0%} of the {full / 1e12:.2f} counting every slot and position, at"
        f" the packing of {what} ({rows} rows packed here: {w['tokens'] / w['positions']:.1%} real"
        f" tokens, {w['images'] / rows:.2f} images per row of {int(s.cfg.data.max_images)} slots)"
    )


def compile_hint(cfg: ml_collections.ConfigDict, sl: Slice, command: str | None = None) -> str:
    """One line: how to compile the step for `sl` (launch/README.md)."""
    cmd = command or f"python -m qwenvl_jax.train --config=configs/{cfg.stage}.py --dry_run"
    if sl.topology:
        return (
            f"JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost {cmd}"
            f" --config.aot.topology={sl.topology} --config.aot.chip_config={sl.chip_config}"
            " (pip install 'qwenvl_jax[tpu]'; minutes on a CPU host; launch/README.md)"
        )
    if sl.chip in _CORES_PER_DEVICE or sl.chip == "v5e":
        chip_config = "megacore" if sl.chip in ("v4", "v5p") else "default"
        return (
            f"JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost {cmd}"
            f" --config.aot.topology={sl.chip}:<AxB[xC] of {sl.devices} chips>"
            f" --config.aot.chip_config={chip_config} (pip install 'qwenvl_jax[tpu]';"
            " launch/README.md)"
        )
    return (
        f"on a host with these {sl.devices} devices: {cmd} --config.aot.slice=local (remat auto"
        " compiles there); on a CPU, tools/aot_cpu_memory.py with as many fake devices"
        " (launch/README.md, Fine-tuning memory)"
    )


def command_line(argv: list[str]) -> str:
    """The trainer's command line as typed (for `dry_run(command=...)`)."""
    return " ".join(["python -m qwenvl_jax.train", *map(shlex.quote, argv[1:])])
