"""Compiler settings: per-platform flags that keep the user's own, and the persistent
compilation cache (a second run loads the compiled train step)."""

import os
import re
import subprocess
import sys

import pytest

from qwenvl_jax.train import compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    env = {"JAX_PLATFORMS": "cpu"}
    assert compiler.apply_flags(env) == {} and env == {"JAX_PLATFORMS": "cpu"}
    env = {"QWENVL_NO_COMPILER_FLAGS": "1"}
    assert compiler.apply_flags(env, platforms={"gpu", "tpu"}) == {}


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


@pytest.mark.slow
def test_second_run_loads_the_train_step_from_the_cache(tmp_path):
    cache = tmp_path / "cache"

    def run(name):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd = [
            sys.executable, "-m", "qwenvl_jax.train", "--config=configs/multitask.py:tiny",
            f"--workdir={tmp_path / name}", "--config.steps=3", "--config.log_every=1",
            "--config.model.overrides.vocab_size=1024",
            "--config.model.overrides.visual.image_start_id=1000",
            "--config.model.overrides.visual.n_queries=16",
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
