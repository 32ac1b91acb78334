"""`config.model.remat_llm` / `remat_vit` = "auto": the lightest rematerialisation that fits.

The trainer compiles the real train step ahead of time with each policy of `LADDER` in turn (the
towers set to "auto" all take the same rung) and keeps the first whose compiled peak (XLA's memory
analysis: arguments + outputs - aliased + temporaries) is within `FRACTION` of a device's memory;
that compiled step is the one the run uses, so the choice costs no extra compile when the first
rung fits. The device's memory is `config.model.remat_fit_gib` if set, else its
`memory_stats()["bytes_limit"]`, or the chip's HBM (`flops.CHIP_HBM_BYTES`) for the ahead-of-time
topologies of `--dry_run`. With none of them (a CPU), the first rung is taken without compiling.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jax
import ml_collections

from qwenvl_jax import flops as flops_lib
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.model import layers
from qwenvl_jax.train.state import Setup, build, check_setup, log
from qwenvl_jax.train.step import aot_compile, compiled_report

# dots keeps every weight matmul's output: on the 7B multi-task step it compiles to the FLOPs of
# no remat at 40 % of its memory (launch/README.md); save_attn keeps q/k/v and the attention
# output; full keeps only each block's input.
LADDER = layers.REMAT_AUTO_LADDER
FRACTION = 0.9  # of a device's memory: room for the runtime's own buffers and fragmentation
TOWERS = ("remat_llm", "remat_vit")


def auto_towers(cfg: ml_collections.ConfigDict) -> list[str]:
    """The config.model remat keys set to "auto" (after checking every remat key's value).

    Raises:
      ConfigError: a remat key names no policy.
    """
    out = []
    for key in TOWERS:
        value = cfg.model[key]
        if value == "auto":
            out.append(key)
        elif value not in layers.REMAT_POLICIES:
            raise ConfigError(
                f"config.model.{key}={value!r}: choose auto or one of"
                f" {sorted(layers.REMAT_POLICIES)}"
            )
    return out


def device_memory_bytes(device) -> int | None:
    """A device's memory: what its runtime reports, else its chip's HBM, else None."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 -- ahead-of-time topology devices have no runtime
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return flops_lib.chip_hbm_bytes(getattr(device, "device_kind", ""))


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def with_remat(cfg: ml_collections.ConfigDict, keys: list[str], policy: str):
    c = copy.deepcopy(cfg)
    for key in keys:
        c.model[key] = policy
    return c


def resolve(cfg: ml_collections.ConfigDict, devices=None) -> tuple[Setup, Any]:
    """(setup, compiled train step or None) for `cfg`, "auto" remat keys resolved.

    Without "auto" this is `build(cfg, devices)` and no compile. The returned setup's `cfg` holds
    the chosen policies.

    Raises:
      ConfigError: a remat key names no policy, or even the last rung does not fit (with the
        peak and the device memory).
    """
    keys = auto_towers(cfg)
    if not keys:
        return build(cfg, devices), None
    names = "/".join(f"config.model.{k}" for k in keys)
    s = build(with_remat(cfg, keys, LADDER[0]), devices)
    check_setup(s)  # a config error is named before any compile
    fit = float(cfg.model.remat_fit_gib)
    limit = int(fit * 2**30) if fit > 0 else device_memory_bytes(s.mesh.devices.flat[0])
    if limit is None:
        log(f"{names}=auto: no device memory to fit, so {LADDER[0]}")
        return s, None
    tried = []
    for i, policy in enumerate(LADDER):
        if i:
            s = build(with_remat(cfg, keys, policy), devices)
        try:
            compiled = aot_compile(s)
        except jax.errors.JaxRuntimeError as e:
            # XLA:TPU refuses, while compiling, a program that cannot fit its HBM.
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            need = re.search(r"temporaries \(([\d.]+\w?)\)", str(e))
            detail = f" ({need[1]})" if need else ""
            tried.append(f"{policy} out of memory when compiled{detail}")
            continue
        peak = compiled_report(compiled).get("peak_estimate_bytes", 0)
        tried.append(f"{policy} {_size(peak)}")
        if peak <= FRACTION * limit:
            log(
                f"{names}=auto: {policy} (compiled peak per device {_size(peak)} of"
                f" {_size(limit)}; tried {', '.join(tried)})"
            )
            return s, compiled
    raise ConfigError(
        f"{names}=auto: no remat policy fits {FRACTION:.0%} of the {_size(limit)} per"
        f" device (compiled peaks: {', '.join(tried)}); use more devices or a smaller"
        " config.device_batch"
    )
