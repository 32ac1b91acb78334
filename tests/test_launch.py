"""launch/tpu_pod.sh: the command every host runs keeps each extra flag whole."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tpu_pod_passes_flags_with_spaces_through_the_remote_shell(tmp_path):
    # A stand-in gcloud that saves the remote command it was asked to run.
    saved = tmp_path / "command.txt"
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(
        '#!/usr/bin/env bash\nwhile [ "$1" != --command ]; do shift; done\n'
        f'printf %s "$2" > {saved}\n'
    )
    gcloud.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", REPO="https://h/r.git")
    flags = ["--config.init.workdir=gs://b/stage 1", "--config.steps=5"]
    subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "tpu", "zone", "configs/sft.py",
         "gs://b/s3", *flags],
        env=env, check=True,
    )  # fmt: skip
    command = saved.read_text()
    head, train = command.split("python -m qwenvl_jax.train")
    assert "git clone -q https://h/r.git qwenvl_jax" in head
    # What the remote shell hands the trainer: each flag one argument, the space kept.
    argv = subprocess.run(
        ["bash", "-c", f"printf '%s\\n'{train}"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert argv == ["--config=configs/sft.py", "--workdir=gs://b/s3", "--distributed", *flags]
