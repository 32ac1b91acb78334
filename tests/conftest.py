"""Test set-up: 8 fake CPU devices for mesh tests, absl flags marked parsed for Grain workers."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import fcntl  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """The quick demo, run once per test session: the xdist workers share one run (the first to
    need it runs it under a file lock; the others wait for it and read it)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's directory
    workdir = str(shared / "quick_demo")
    done = os.path.join(workdir, "TEST_SESSION_OK")
    with open(shared / "quick_demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the run below is over, on this worker
        if not os.path.exists(done):
            _run_quick_demo(workdir)
            open(done, "w").close()
    with open(os.path.join(workdir, "results.json")) as f:
        return workdir, json.load(f)


def _run_quick_demo(workdir: str):
    # The README's first command, on the quick setting, in a fresh process.
    shutil.rmtree(workdir, ignore_errors=True)  # a run that failed on another worker
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    cmd = [sys.executable, "-m", "qwenvl_jax.train", f"--workdir={workdir}", "--demo_setting=quick"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "held-out evaluation (quick)" in proc.stdout and "blind prior" in proc.stdout


@pytest.fixture(scope="session")
def tok():
    """The published Qwen-VL tokenizer (tiktoken vocabulary, 256-position image spans)."""
    from qwenvl_jax.tokenizer import QWenTokenizer

    return QWenTokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Qwen-VL checkpoint in the published HF layout (reference_weights.write_hf_dir)."""
    from reference_weights import write_hf_dir

    out = tmp_path_factory.mktemp("tiny_hf")
    write_hf_dir("tiny", str(out))
    return str(out)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, with this process's environment pointed at it for the module's tests."""
    from gcs_emulator import GcsEmulator

    emu = GcsEmulator()
    env = emu.start()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    # fsspec reads FSSPEC_GCS_TOKEN when it is imported, which may have happened already.
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    try:
        yield emu
    finally:
        fsspec.config.conf.get("gcs", {}).pop("token", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emu.stop()
