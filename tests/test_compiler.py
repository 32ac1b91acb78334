"""Compiler settings: per-platform flags that keep the user's own, and the persistent
compilation cache (a second run loads the compiled train step)."""

import os
import re
import subprocess
import sys

import pytest
from paths import ROOT
from tiny import TINY_FLAGS

from qwenvl_jax import compiler


def test_flags_per_platform_keep_what_the_user_set():
    env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_foo=1"}
    out = compiler.apply_flags(env, platforms={"gpu"})
    flags = env["XLA_FLAGS"].split()
    assert out["XLA_FLAGS"] == env["XLA_FLAGS"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags  # the user's value stays
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    assert "--xla_foo=1" in flags and "--xla_gpu_enable_pipelined_all_gather=true" in flags
    assert "LIBTPU_INIT_ARGS" not in env
    env = {}
    compiler.apply_flags(env, platforms={"tpu"})
    assert env["LIBTPU_INIT_ARGS"].split() == list(compiler.TPU_LIBTPU_ARGS)
    assert "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cpu", "QWENVL_SYSTEM_MALLOC": "1"}  # malloc: the test below
    assert compiler.apply_flags(env) == {}
    assert env == {"JAX_PLATFORMS": "cpu", "QWENVL_SYSTEM_MALLOC": "1"}  # nothing added
    env = {"QWENVL_NO_COMPILER_FLAGS": "1"}
    assert compiler.apply_flags(env, platforms={"gpu", "tpu"}) == {}


def test_gpu_memory_fraction_default_and_the_users_value():
    env = {}
    compiler.apply_flags(env, platforms={"gpu"})
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"  # JAX's own default is 0.75
    # Triton GEMMs stay on (slower without them on an H200: compiler.py's docstring).
    assert "triton_gemm" not in env["XLA_FLAGS"]
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}
    compiler.apply_flags(env, platforms={"gpu"}, gpu_memory_fraction=0.8)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".5"
    env = {}
    compiler.apply_flags(env, platforms={"gpu"}, gpu_memory_fraction=0.8)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8"
    env = {}
    compiler.apply_flags(env, platforms={"tpu"})
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
    with pytest.raises(ValueError, match="GPU memory fraction 1.5 is not in"):
        compiler.apply_flags({}, platforms={"gpu"}, gpu_memory_fraction=1.5)


def test_gpu_flags_are_known_to_this_xla():
    """XLA aborts on an unknown flag in XLA_FLAGS, and XLA:CPU parses the GPU ones too, so a
    flag renamed or removed in a newer XLA shows up here, without a GPU."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(compiler.GPU_XLA_FLAGS))
    code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == b"3.0", out.stderr.decode()[-2000:]
    env["XLA_FLAGS"] += " --xla_gpu_no_such_flag=true"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert out.returncode != 0  # the check above would catch a stale flag


_FAULTS = """
import resource, sys
from qwenvl_jax import compiler
kept = compiler.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((16, 1 << 20), jnp.float32)  # 64 MiB
double = jax.jit(lambda x: x * 2)  # a fresh 64 MiB result per call
double(x).block_until_ready()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    double(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, min(faults))
"""


def _fewest_faults(**env) -> tuple[str, int]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    kept, faults = out.stdout.split()
    return kept.decode(), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_steps_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    """A jitted step's 64 MiB result: with malloc's defaults every call maps fresh pages (16,384
    page faults of 4 KiB); with keep_freed_memory a call takes back the memory the last one freed.
    (Not every call: when the last result is freed only after the next is allocated, which JAX's
    asynchronous deletion makes more frequent on a busy machine, the next call faults; 13 of 20
    calls faulted nothing on the idle dev box. Hence the fewest faults of 20 calls.)"""
    kept, system = _fewest_faults(QWENVL_SYSTEM_MALLOC="1")
    assert kept == "False" and system > 16000  # every call: the cost the setting removes
    kept, faults = _fewest_faults()
    assert kept == "True" and faults < 100, faults


@pytest.mark.slow
def test_second_run_loads_the_train_step_from_the_cache(tmp_path):
    cache = tmp_path / "cache"

    def run(name):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd = [
            sys.executable, "-m", "qwenvl_jax.train", "--config=configs/multitask.py:tiny",
            f"--workdir={tmp_path / name}", "--config.steps=3", "--config.log_every=1",
            *TINY_FLAGS,
            f"--config.compilation_cache_dir={cache}",
        ]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=900)
        assert out.returncode == 0, out.stderr.decode()[-3000:]
        m = re.search(rb"train step compiled in ([\d.]+)s, persistent cache hits (\d+)", out.stdout)
        assert m, out.stdout.decode()[-3000:]
        return float(m.group(1)), int(m.group(2))

    first_s, first_hits = run("a")
    assert first_hits == 0
    assert len(os.listdir(cache)) > 0  # the compiled programs were written
    second_s, second_hits = run("b")
    assert second_hits >= 1
    print(f"train step: compiled in {first_s:.1f}s, loaded from the cache in {second_s:.1f}s")


_HLO = """HloModule jit_step, entry_computation_layout={()->()}

%gather_body (p: bf16[2,4]) -> bf16[4,4] {
  %p = bf16[2,4]{1,0} parameter(0)
  ROOT %all-gather.7 = bf16[4,4]{1,0} all-gather(%p), channel_id=3, dimensions={0}
}

%async_collective_fusion.2 (q: f32[8]) -> f32[8] {
  %q = f32[8]{0} parameter(0)
  ROOT %all-gather.9 = f32[8]{0} all-gather(%q), channel_id=4, dimensions={0}
}

ENTRY %main (a: bf16[2,4], b: f32[8]) -> f32[8] {
  %a = bf16[2,4]{1,0} parameter(0)
  %b = f32[8]{0} parameter(1)
  %async-collective-start.1 = (bf16[2,4], bf16[4,4]) fusion(%a), kind=kCustom, calls=%gather_body
  %all-reduce.3 = f32[8]{0} all-reduce(%b), channel_id=5, to_apply=%add
  %all-reduce-start.4 = f32[8]{0} all-reduce-start(%b), channel_id=6, to_apply=%add
  %cc.5 = f32[8] custom-call(%b), custom_call_target="tpu_custom_call", backend_config="splash_fwd"
  ROOT %fusion.6 = f32[8]{0} fusion(%b), kind=kCustom, calls=%async_collective_fusion.2
}
"""


def test_program_summary_counts_kernels_and_async_collectives():
    """Read from hand-written HLO: the all-gather called from an async-collective-start and the one
    inside an async collective fusion are asynchronous, as is the all-reduce-start; the plain
    all-reduce is synchronous; one Pallas (TPU custom) call, the splash kernel."""
    from qwenvl_jax.train.aot import program_summary

    got = program_summary(_HLO)
    assert got["pallas_calls"] == 1 and got["splash_attention"]
    assert got["collectives_by_op"] == {
        "all-gather": {"async": 2, "sync": 0},
        "all-reduce": {"async": 1, "sync": 1},
    }
    assert (got["collectives_async"], got["collectives_sync"]) == (3, 1)
    assert not program_summary(_HLO.replace("splash_fwd", "matmul"))["splash_attention"]
