"""`config.model.remat_llm` / `remat_vit` = "auto": the lightest rematerialisation that fits;
and the trainer's one compile-to-fit loop, which also decides `config.mesh.model` = "auto"
(`train.model_axis`: model = 1 where it fits with a policy no heavier than model = 2's).

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
from qwenvl_jax.train import model_axis, validate
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
    """(setup, compiled train step or None) for `cfg`, its "auto" remat keys and model axis
    (`train.model_axis`) resolved: the trainer's one compile-to-fit loop.

    Without "auto" this is `build(cfg, devices)` and no compile. With a model axis of "auto", the
    steps are tried in order of (remat policy, model axis), model = 1 before 2 at each policy, so
    the first that fits is the lightest policy and, at it, model = 1 where it fits: model = 1 is
    chosen exactly when it fits with a policy no heavier than model = 2's. With a fixed remat
    policy, model = 2 is taken without a fit check when model = 1 does not fit (as a fixed policy
    always is). The returned setup's `cfg` holds the chosen policies and model axis.

    Raises:
      ConfigError: a remat key names no policy, the model axis fits neither the devices nor the
        batch, or no step tried fits (with the peaks and the device memory).
    """
    keys = auto_towers(cfg)
    n = len(jax.devices() if devices is None else devices)
    axes = validate.model_axes(cfg, n)  # the sizes the devices and the batch allow
    auto_axis = model_axis.is_auto(cfg)
    if not keys and not auto_axis:
        return build(cfg, devices), None

    def at(policy: str | None, m: int) -> ml_collections.ConfigDict:
        return model_axis.with_model(with_remat(cfg, keys, policy) if policy else cfg, m)

    names = "/".join(f"config.model.{k}" for k in keys)
    ladder = LADDER if keys else (None,)  # None: the config's own policies
    s = build(at(ladder[0], axes[0]), devices)
    check_setup(s)  # a config error is named before any compile
    if auto_axis and len(axes) == 1:
        only = f"the only one of {model_axis.CHOICES} that {n} devices and the batch allow"
        _log_axis(axes[0], only)
        if not keys:
            return s, None
    fit = float(cfg.model.remat_fit_gib)
    limit = int(fit * 2**30) if fit > 0 else device_memory_bytes(s.mesh.devices.flat[0])
    if limit is None:
        if keys:
            log(f"{names}=auto: no device memory to fit, so {LADDER[0]}")
        if len(axes) > 1:
            _log_axis(axes[0], "no device memory to fit")
        return s, None
    tried = []
    for policy in ladder:
        for j, m in enumerate(axes):
            if tried:
                s = build(at(policy, m), devices)
            if policy is None and j == len(axes) - 1:
                why = f"{tried[0]} does not fit {_size(limit)} with the config's remat policies"
                _log_axis(m, why)
                return s, None
            peak, compiled = _compiled_peak(s)
            what = [f"model={m}"] if len(axes) > 1 else []
            what += [policy] if policy else []
            tried.append(" ".join([*what, _size(peak) if compiled else peak]))
            if compiled is None or peak > FRACTION * limit:
                continue
            of = f"compiled peak per device {_size(peak)} of {_size(limit)}"
            if keys:
                log(f"{names}=auto: {policy} ({of}; tried {', '.join(tried)})")
            if len(axes) > 1:
                how = f"remat {policy}" if keys else "the config's remat policies"
                _log_axis(m, f"{of} with {how}; tried {', '.join(tried)}")
            return s, compiled
    what = f"{names}=auto: no remat policy"
    if len(axes) > 1:
        what += f" and model axis of {tuple(axes)} (config.mesh.model=auto)"
    raise ConfigError(
        f"{what} fits {FRACTION:.0%} of the {_size(limit)} per device (compiled peaks:"
        f" {', '.join(tried)}); use more devices or a smaller config.device_batch"
    )


def _compiled_peak(s: Setup) -> tuple[Any, Any]:
    """(the compiled step's peak bytes per device, the compiled step), or (why, None) when XLA
    refuses to compile a program that cannot fit."""
    try:
        compiled = aot_compile(s)
    except jax.errors.JaxRuntimeError as e:
        # XLA:TPU refuses, while compiling, a program that cannot fit its HBM.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"temporaries \(([\d.]+\w?)\)", str(e))
        return "out of memory when compiled" + (f" ({need[1]})" if need else ""), None
    return compiled_report(compiled).get("peak_estimate_bytes", 0), compiled


def _log_axis(m: int, why: str) -> None:
    log(f"config.mesh.model=auto: {m} ({why})")
