"""Dry run: resolved config, mesh and per-device bytes; ahead-of-time compiles for TPU slices."""

from __future__ import annotations

import re
import time

import ml_collections

from qwenvl_jax import sharding as shd
from qwenvl_jax.train import inputs
from qwenvl_jax.train import remat as remat_lib
from qwenvl_jax.train.state import check_setup, describe, step_model_flops
from qwenvl_jax.train.step import aot_compile, compiled_report  # noqa: F401 (aot's API too)

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

    from qwenvl_jax.train import compiler

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


def dry_run(cfg: ml_collections.ConfigDict) -> dict:
    """Prints config, mesh and per-device bytes; compiles AOT for config.aot.topology if set.
    Needs no data: with none given it says what a real run needs."""
    print(inputs.describe(cfg, dry_run=True))
    print(cfg)
    devices = topology_devices(cfg)
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
    return out
