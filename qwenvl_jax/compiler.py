"""Compiler settings of a run (training, bench, server): XLA flags per platform, the GPU memory
share and the persistent compilation cache.

`apply_flags()` runs in `python -m qwenvl_jax.train` before JAX creates its backends (the flags are
read then); launch/tpu_pod.sh exports the same TPU flags on every host. A flag the user already
set (in XLA_FLAGS or LIBTPU_INIT_ARGS) is left as the user set it.

- GPU (`XLA_FLAGS`): the latency-hiding scheduler, while-loop double buffering and pipelined,
  combined collectives, as NVIDIA's JAX-Toolbox recommends for FSDP training (rosetta/docs/
  GPU_performance.md: collectives overlap compute; they change nothing on one GPU); XLA's own
  rematerialization pass off (the model's remat policies decide what is recomputed, train/remat.py
  sizes them against the device). XLA's Triton GEMMs stay on: turning them off
  (`--xla_gpu_enable_triton_gemm=false`) slowed a 4096^3 bf16 matmul from 421 to 335 TFLOP/s on
  an H200 (issue 25); `python -m qwenvl_jax.bench --suite=device` times the step with these flags.
- GPU memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`): JAX preallocates 75 % of the GPU by default;
  training and serving take `GPU_MEMORY_FRACTION` (0.9, JAX-Toolbox's usual value: the rest is
  left to cuDNN/cuBLAS workspaces and the CUDA context), so a shape that fits in 90 % is not
  pushed to a heavier remat policy. Set the variable yourself to choose another.
- TPU (`LIBTPU_INIT_ARGS`): asynchronous collective fusion and compute/collective overlap, and the
  data-parallel all-reduce optimisation, as MaxText sets them for v4/v5p/v6e.

- CPU (`keep_freed_memory`, Linux with glibc): malloc keeps the memory a step frees for the
  next step (one arena, no mmap'd chunks, no trimming under 2 GiB) instead of handing it back to
  the kernel. Otherwise every step's large buffers (a decode step's [rows, vocabulary] logits, its
  attended keys and values) are fresh pages, faulted in one 4 KiB page at a time: the `tiny`
  serving model's 32-row decode step took 3,300 page faults and ~10 ms of system time per step
  (45 -> 41 ms per step at 512 attended positions, measured on the 2-core dev box; one row
  unchanged). `QWENVL_SYSTEM_MALLOC=1` leaves malloc as it is.

`enable_cache(dir)` points JAX's persistent compilation cache at a directory (local or gs://), so
a restarted or resumed run loads the compiled step instead of compiling it again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_disable_hlo_passes=rematerialization",
)
GPU_MEMORY_FRACTION = 0.9
TPU_LIBTPU_ARGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)


def _merge(current: str, defaults: tuple[str, ...]) -> str:
    """`current` plus each default whose flag name it does not already set."""
    have = {part.split("=", 1)[0] for part in current.split()}
    extra = [f for f in defaults if f.split("=", 1)[0] not in have]
    return " ".join([current.strip(), *extra]).strip()


def _platforms(env) -> set[str]:
    """The accelerators this process may use, without initialising JAX: the installed plugins,
    unless JAX_PLATFORMS names the platform."""
    requested = env.get("JAX_PLATFORMS", "").lower()
    if requested:
        return {p.strip().replace("cuda", "gpu") for p in requested.split(",")}
    import importlib.util

    found = set()
    if importlib.util.find_spec("libtpu") is not None:
        found.add("tpu")
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        found.add("gpu")
    return found


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_KEEP_FREED = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1),
               (_M_TOP_PAD, 64 << 20))  # fmt: skip


def keep_freed_memory(env=None, platforms: set[str] | None = None) -> bool:
    """On the CPU backend under glibc, malloc keeps freed memory for the next allocation (see the
    module docstring); before JAX starts its threads (an arena made earlier keeps its own rules).
    Returns whether it did: not on an accelerator, another C library, or with
    `QWENVL_SYSTEM_MALLOC` set."""
    env = os.environ if env is None else env
    platforms = _platforms(env) if platforms is None else platforms
    if env.get("QWENVL_SYSTEM_MALLOC") or platforms - {"cpu"} or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc's mallopt takes these parameters
            return False
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _KEEP_FREED)


def set_gpu_memory_fraction(
    env=None, fraction: float | None = None, platforms: set[str] | None = None
) -> dict[str, str]:
    """XLA_PYTHON_CLIENT_MEM_FRACTION on GPU (default GPU_MEMORY_FRACTION) unless the environment
    already sets it; before JAX starts its backends. The trainer (through `apply_flags`), the
    bench and the server (`python -m qwenvl_jax.serve`) call it. Returns what it set."""
    env = os.environ if env is None else env
    fraction = GPU_MEMORY_FRACTION if fraction is None else fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"GPU memory fraction {fraction} is not in (0, 1]")
    platforms = _platforms(env) if platforms is None else platforms
    if "gpu" not in platforms or "XLA_PYTHON_CLIENT_MEM_FRACTION" in env:
        return {}
    out = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:g}"}
    env.update(out)
    return out


def apply_flags(
    env=None, platforms: set[str] | None = None, gpu_memory_fraction: float | None = None
) -> dict[str, str]:
    """Adds the compiler flags of the platforms in use, and on GPU the memory fraction, to the
    environment (before JAX starts its backends); on the CPU backend, `keep_freed_memory`.
    `QWENVL_NO_COMPILER_FLAGS=1` leaves the environment as it is.

    Args:
        env: the environment to change (default os.environ).
        platforms: {"gpu", "tpu", ...} (default: JAX_PLATFORMS, else the installed plugins).
        gpu_memory_fraction: XLA_PYTHON_CLIENT_MEM_FRACTION on GPU (default GPU_MEMORY_FRACTION);
            a value already in the environment wins.

    Returns:
        The variables set, {name: value}.
    """
    env = os.environ if env is None else env
    if env.get("QWENVL_NO_COMPILER_FLAGS"):
        return {}
    platforms = _platforms(env) if platforms is None else platforms
    out = set_gpu_memory_fraction(env, gpu_memory_fraction, platforms)
    if "gpu" in platforms:
        out["XLA_FLAGS"] = _merge(env.get("XLA_FLAGS", ""), GPU_XLA_FLAGS)
    if "tpu" in platforms:
        out["LIBTPU_INIT_ARGS"] = _merge(env.get("LIBTPU_INIT_ARGS", ""), TPU_LIBTPU_ARGS)
    env.update(out)
    keep_freed_memory(env, platforms)
    return out


class CacheStats:
    """Counts persistent-cache hits and misses of this process (JAX's monitoring events)."""

    def __init__(self):
        import jax

        self.hits = self.misses = 0

        def listen(event: str, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                self.hits += 1
            elif event == "/jax/compilation_cache/cache_misses":
                self.misses += 1

        jax.monitoring.register_event_listener(listen)


_STATS: list[CacheStats] = []


def enable_cache(cache_dir: str, min_compile_secs: float = 1.0) -> CacheStats | None:
    """JAX's persistent compilation cache in `cache_dir` (a local path or gs://...); returns the
    process's hit/miss counter (None without a directory)."""
    import jax

    if not cache_dir:
        return None
    if "://" not in cache_dir:
        cache_dir = os.path.abspath(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    logging.info("persistent compilation cache: %s", cache_dir)
    if not _STATS:
        _STATS.append(CacheStats())
    return _STATS[0]
