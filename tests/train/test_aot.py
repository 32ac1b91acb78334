"""The dry run on any machine: a named slice's mesh and per-device bytes from abstract shapes, no
devices, no compile, and the command that compiles for it (train/aot.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from qwenvl_jax import train
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import aot, stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QWEN_VL_PARAMS = 9_656_935_168  # the published Qwen-VL parameter count
GIB = 2**30


@pytest.mark.parametrize(
    "name,devices,chip",
    [
        # Cloud TPU names: v4 and v5p count TensorCores, two per chip, and JAX sees one device
        # per chip (megacore); v5e (v5litepod) and v6e count chips.
        ("v5p-64", 32, "v5p"),
        ("v5p-8", 4, "v5p"),
        ("v4-32", 16, "v4"),
        ("v5e-16", 16, "v5e"),
        ("v5litepod-16", 16, "v5e"),
        ("v6e-64", 64, "v6e"),
        ("8xh100", 8, "h100"),
        ("1xh200", 1, "h200"),
        ("8", 8, None),
    ],
)
def test_slice_names(name, devices, chip):
    sl = aot.parse_slice(name)
    assert (sl.devices, sl.chip) == (devices, chip)


@pytest.mark.parametrize("name", ["v5p-7", "v5p-1", "v9-8", "0", "h100", "0xh100", "", "lots"])
def test_a_bad_slice_name_says_what_is_valid(name):
    with pytest.raises(ConfigError, match="v5p-64.*8xh100"):
        aot.parse_slice(name)


def test_7b_stage_laid_out_for_v5p_64_on_this_machine(capsys):
    """The tests see 8 CPU devices; the multi-task stage is laid out over v5p-64's 32."""
    out = train.dry_run(stage_config.load("multitask"))
    printed = capsys.readouterr().out
    assert out["slice"] == "v5p-64" and out["devices"] == 32
    # mesh.model "auto" is laid out as 1 where nothing compiles to decide it (train/model_axis.py)
    assert out["mesh"] == {"data": 1, "fsdp": 32, "model": 1}
    assert "config.mesh.model=auto: chosen by compiling" in printed
    assert f"{QWEN_VL_PARAMS:,}" in printed
    # f32 master weights over 32 devices, Adam's two moments twice that (small norms and biases
    # are replicated: under 1 %); the same as the libtpu ahead-of-time compile for v5p-64
    # measured (launch/README.md: 1.13 + 2.26 GiB per chip).
    np.testing.assert_allclose(out["param_bytes"], QWEN_VL_PARAMS * 4 / 32, rtol=0.01)
    np.testing.assert_allclose(out["opt_bytes"], 2 * out["param_bytes"], rtol=0.01)
    assert round(out["param_bytes"] / GIB, 2) == 1.13
    assert round(out["opt_bytes"] / GIB, 2) == 2.26
    hint = [ln for ln in printed.splitlines() if ln.startswith("compile for it: ")]
    assert len(hint) == 1
    assert "--config.aot.topology=v5p:4x4x2 --config.aot.chip_config=megacore" in hint[0]


def test_slice_flag_and_lora_default(capsys):
    c = stage_config.load("sft:lora")
    assert c.aot.slice == "1xh100"  # launch/README.md: LoRA fits one 80 GB GPU
    c.aot.slice = "v6e-64"
    c.lora.rank = 0  # full fine-tuning: the base is the trained tree
    out = train.dry_run(c)
    assert out["devices"] == 64 and out["mesh"] == {"data": 1, "fsdp": 64, "model": 1}
    # bf16 weights split 64 ways: at least a perfect split's share, well under a 32-way one.
    assert QWEN_VL_PARAMS * 2 / 64 <= out["param_bytes"] < QWEN_VL_PARAMS * 2 / 48
    assert "--config.aot.topology=v6e:8x8 --config.aot.chip_config=default" in (
        capsys.readouterr().out
    )


def test_tiny_stage_dry_runs_on_this_machine():
    c = stage_config.load("multitask:tiny")
    assert c.aot.slice == "local"
    out = train.dry_run(c)
    assert "slice" not in out and out["mesh"] == {"data": 8, "fsdp": 1, "model": 1}


def test_readme_dry_run_on_one_cpu_device_from_any_directory(tmp_path):
    """The README's command, run where there is no configs/ and one CPU device: exit 0, the
    resolved config, the mesh for the stage's slice, per-device bytes and how to compile."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "qwenvl_jax.train", "--config=configs/multitask.py", "--dry_run"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "stage: multitask" in p.stdout  # the resolved config
    assert "mesh {'data': 1, 'fsdp': 32, 'model': 1} over 32 devices" in p.stdout
    assert "per-device bytes: params 1.13" in p.stdout
    assert "compile for it: JAX_PLATFORMS=cpu" in p.stdout
    assert os.listdir(tmp_path) == []  # a dry run writes nothing
