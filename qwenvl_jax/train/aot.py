"""Dry run: resolved config, mesh and per-device bytes; ahead-of-time compiles for TPU slices."""

from __future__ import annotations

import time

import ml_collections

from qwenvl_jax import sharding as shd
from qwenvl_jax.train import inputs
from qwenvl_jax.train.state import Setup, build, check_setup, describe, step_model_flops
from qwenvl_jax.train.step import abstract_batch, make_train_step


def aot_compile(s: Setup):
    """Lowers and compiles the real train step for the setup's devices with abstract inputs."""
    step = make_train_step(s)
    lowered = step.lower(s.abstract_params, s.abstract_opt, abstract_batch(s))
    return lowered.compile()


def compiled_report(compiled) -> dict:
    out = {}
    mem = compiled.memory_analysis()
    if mem is not None:
        for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            out[k] = int(getattr(mem, k, 0) or 0)
        out["peak_estimate_bytes"] = (
            out["argument_size_in_bytes"]
            + out["output_size_in_bytes"]
            - out["alias_size_in_bytes"]
            + out["temp_size_in_bytes"]
        )
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    if cost:
        # XLA counts the body of each while loop (micro-batch scan, layer scans) once.
        out["xla_flops_per_device_loop_bodies_once"] = float(cost.get("flops", 0.0))
    return out


def topology_devices(cfg) -> list | None:
    if not cfg.aot.get("topology"):
        return None
    from jax.experimental import topologies

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
    s = build(cfg, devices)
    print(describe(s))
    check_setup(s)
    out = {"mesh": dict(s.mesh.shape)}
    out["param_bytes"] = shd.device_bytes(s.abstract_params, s.param_sharding)
    out["opt_bytes"] = shd.device_bytes(s.abstract_opt, s.opt_sharding)
    if devices is not None:
        t0 = time.time()
        rep = compiled_report(aot_compile(s))
        out.update(rep)
        print(
            f"AOT compile for {cfg.aot.topology} ({len(devices)} chips) in {time.time() - t0:.0f}s"
        )
        for k, v in rep.items():
            print(f"  {k}: {v / 2**30:.3f} GiB" if k.endswith("bytes") else f"  {k}: {v:.4g}")
        n = len(devices)
        print(
            f"  model FLOPs per device per step: {step_model_flops(s) / n / 1e12:.2f} TFLOP"
            f" ({step_model_flops(s) / n / s.accum / 1e12:.2f} per micro-batch)"
        )
    return out
