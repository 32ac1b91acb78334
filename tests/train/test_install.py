"""The package installs with its stage configs: a wheel built from this tree, installed alone into
a fresh virtual environment, trains `--config=configs/sft.py:tiny` from an empty directory."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from tiny import TINY_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_wheel_trains_a_stage_config_from_an_empty_directory(tmp_path):
    # Build from a copy of what setup.py reads, so the build's build/ and *.egg-info land there,
    # not in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), src)
    shutil.copytree(
        os.path.join(ROOT, "qwenvl_jax"),
        src / "qwenvl_jax",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src])
    (wheel,) = dist.glob("qwenvl_jax-*.whl")

    # A fresh environment whose own site-packages holds only the wheel. Its dependencies come from
    # this environment's site-packages through a .pth line: that adds the directory to sys.path
    # but runs none of the .pth files in it, so the checkout's editable install (a .pth import
    # hook) cannot shadow the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = str(venv / "bin" / "python")
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = site.stdout.strip()
    _run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", site, wheel])
    with open(os.path.join(site, "_qwenvl_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"  # one CPU device, as on a laptop
    where = _run([py, "-c", "import qwenvl_jax; print(qwenvl_jax.__file__)"], cwd=empty, env=env)
    assert where.stdout.strip() == os.path.join(site, "qwenvl_jax", "__init__.py")

    workdir = tmp_path / "w"
    train = [
        py, "-m", "qwenvl_jax.train", "--config=configs/sft.py:tiny", f"--workdir={workdir}",
        "--config.steps=2", "--config.optim.warmup_steps=1",
        # A smaller vocabulary and batch keep the compile short; the config still comes whole
        # from the installed configs/sft.py.
        *TINY_FLAGS,
        "--config.batch_size=2", "--config.grad_accum=1",
    ]  # fmt: skip
    p = _run(train, cwd=empty, env=env)
    assert "step 2/2" in p.stdout, p.stdout[-2000:]
    assert os.listdir(empty) == []  # everything went to the workdir
    assert os.path.isdir(workdir / "checkpoints")
