"""launch/tpu_pod.sh: the command every host runs keeps each extra flag whole."""

import os
import subprocess

from paths import ROOT


def _fake_gcloud(tmp_path):
    """A stand-in gcloud in tmp_path that saves the remote command it was asked to run; returns
    the file it saves it to."""
    saved = tmp_path / "command.txt"
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(
        '#!/usr/bin/env bash\nwhile [ "$1" != --command ]; do shift; done\n'
        f'printf %s "$2" > {saved}\n'
    )
    gcloud.chmod(0o755)
    return saved


def test_tpu_pod_passes_flags_with_spaces_through_the_remote_shell(tmp_path):
    saved = _fake_gcloud(tmp_path)
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


def test_tpu_pod_forwards_the_users_libtpu_flags(tmp_path):
    """LIBTPU_INIT_ARGS set where the script runs reaches every host whole (the trainer adds its
    defaults to it there, keeping the user's values: qwenvl_jax/compiler.py)."""
    saved = _fake_gcloud(tmp_path)
    user = "--xla_tpu_enable_async_collective_fusion=false --xla_foo=1"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", REPO="https://h/r.git")
    script = [
        "bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "tpu", "zone", "configs/sft.py", "gs://b",
    ]  # fmt: skip
    for value, want in ((user, user), (None, "")):
        if value is None:
            env.pop("LIBTPU_INIT_ARGS", None)
        else:
            env["LIBTPU_INIT_ARGS"] = value
        subprocess.run(script, env=env, check=True)
        head = saved.read_text().split("python -m qwenvl_jax.train")[0]
        seen = subprocess.run(
            [
                "bash",
                "-c",
                head.split("pip install")[1].split(";", 1)[1] + ' printf %s "$LIBTPU_INIT_ARGS"',
            ],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": os.environ["PATH"]},
        ).stdout
        assert seen == want
