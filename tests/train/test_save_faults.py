"""Saves that fail for real: a full disk and a checkpoint directory made read-only mid-run.

Each run is the trainer's command line in a private mount namespace (`unshare -rm`: no root
needed where user namespaces are allowed), held after step 2 (`config.pause_after_step`) once
step 1's checkpoint is complete; then the fault is made (a tmpfs filled to the last byte, or a
read-only bind mount) and the run released. It must stop with one line naming the step, the path
and the OS error, exit 2, leave step 1 intact, and exit promptly: before the fix, Orbax's writer
threads waited 300 s each for a directory that was never made.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from paths import ROOT
from tiny import TINY_FLAGS

from qwenvl_jax import checkpoint as ckpt_lib

EXIT_WITHIN_S = 60  # from release to exit; the hang this guards against lasted 300 s

TRAIN = [
    sys.executable, "-m", "qwenvl_jax.train", "--config=configs/multitask.py:tiny",
    "--config.steps=3", "--config.checkpoint.every_steps=1", "--config.log_every=1",
    *TINY_FLAGS, "--config.pause_after_step=2",
]  # fmt: skip

# Runs inside the namespace: $CK may be mounted over, the run is held after step 2 until the
# fault is in place, then released; prints how long it took to exit after the release.
SCRIPT = textwrap.dedent(
    """
    set -u
    mkdir -p "$CK"
    if [ "$FAULT" = full ]; then mount -t tmpfs -o size=64m tmpfs "$CK"
    else mount --bind "$CK" "$CK"; fi
    "$@" > "$WD.out" 2> "$WD.err" &
    pid=$!
    while [ ! -e "$WD/paused_at_step_2.process_0" ] || [ ! -d "$CK/1" ]; do
      kill -0 $pid 2>/dev/null || { echo "exited before the hold"; exit 90; }
      sleep 0.1
    done
    if [ "$FAULT" = full ]; then dd if=/dev/zero of="$CK/fill" bs=1M 2>/dev/null
    else mount -o remount,ro,bind "$CK"; fi
    t0=$(date +%s)
    rm "$WD/paused_at_step_2.process_0"
    wait $pid; rc=$?
    echo "rc=$rc exit_s=$(( $(date +%s) - t0 ))"
    # A tmpfs ends with the namespace: what the run left is copied out for the checks.
    rm -f "$CK/fill"; mkdir -p "$WD.after"; cp -a "$CK" "$WD.after/"
    """
)


def _userns_mounts() -> bool:
    try:
        probe = subprocess.run(
            [
                "unshare",
                "-rm",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp",
            ],  # fmt: skip
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,  # the command line in a fresh process, compiling the step
    pytest.mark.skipif(
        shutil.which("unshare") is None or not _userns_mounts(),
        reason="needs `unshare -rm` (a mount namespace) to make a real full disk or read-only"
        " mount",
    ),
]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _run(tmp_path, fault, jax_cache):
    wd = str(tmp_path / "run")
    ck = os.path.join(wd, "checkpoints")
    env = dict(os.environ, WD=wd, CK=ck, FAULT=fault, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_COMPILATION_CACHE_DIR"] = jax_cache  # the second test loads the first one's step
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    done = subprocess.run(
        ["unshare", "-rm", "bash", "-c", SCRIPT, "fault", *TRAIN, f"--workdir={wd}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    err = open(wd + ".err").read() if os.path.exists(wd + ".err") else ""
    m = re.search(r"rc=(\d+) exit_s=(\d+)", done.stdout)
    assert m, (done.stdout, done.stderr, err[-3000:])
    return wd, int(m.group(1)), int(m.group(2)), err


def _check_step1_intact(wd):
    after = wd + ".after"
    shutil.copy(os.path.join(wd, "config.json"), after)
    assert ckpt_lib.workdir_steps(after) == [1]
    # Reading verifies every array against the checksums saved with it.
    assert ckpt_lib.read_params(after)[2] == 1


def test_disk_full_during_a_save(tmp_path, jax_cache):
    wd, rc, exit_s, err = _run(tmp_path, "full", jax_cache)
    last = err.strip().splitlines()[-1]
    ck = os.path.join(wd, "checkpoints")
    assert re.fullmatch(
        rf"error: could not save checkpoint step 2: {re.escape(ck)}\S*: No space left on device"
        rf" \[errno 28\]; step 1 is intact in {re.escape(ck)}",
        last,
    ), err[-3000:]
    assert rc == 2 and exit_s < EXIT_WITHIN_S
    _check_step1_intact(wd)


def test_checkpoint_directory_made_read_only(tmp_path, jax_cache):
    wd, rc, exit_s, err = _run(tmp_path, "ro", jax_cache)
    ck = os.path.join(wd, "checkpoints")
    assert err.strip().splitlines()[-1] == (
        f"error: could not save checkpoint step 2: {ck}/2.orbax-checkpoint-tmp: Read-only file"
        f" system [errno 30]; step 1 is intact in {ck}"
    ), err[-3000:]
    assert rc == 2 and exit_s < EXIT_WITHIN_S
    _check_step1_intact(wd)
