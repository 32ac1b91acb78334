"""gs:// everywhere a path goes, against a local GCS emulator (tests/gcs_emulator.py).

The trainer writes config.json, train_config.json, metrics.jsonl, TensorBoard event files and
Orbax checkpoints to a gs:// workdir and resumes from it after a SIGKILL with bit-identical losses;
the data pipeline reads a JSON file and its images from the bucket; a run initialises from a gs://
workdir and from a gs:// converted checkpoint; single images load from gs://.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from held import wait_until
from paths import ROOT
from PIL import Image
from tiny import TINY_FLAGS, train_config

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import fileio, train
from qwenvl_jax import image as qimage
from qwenvl_jax.data import pipeline
from qwenvl_jax.tokenizer import QWenTokenizer

STEPS = 8


def _cli(gcs, workdir, cache_dir, *extra):
    env = dict(os.environ, **gcs.env)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    # The restarted run reuses the compiled step (the same program).
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [
        sys.executable, "-m", "qwenvl_jax.train", "--config=configs/multitask.py:tiny",
        f"--workdir={workdir}", f"--config.steps={STEPS}", "--config.checkpoint.every_steps=2",
        "--config.log_every=1", *TINY_FLAGS, *extra,
    ]  # fmt: skip
    return cmd, env


def _losses(workdir):
    """Last logged loss of each step (a restarted run re-logs the steps after its checkpoint)."""
    out = {}
    for line in fileio.read_text(fileio.join(workdir, "metrics.jsonl")).splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def gs_run(gcs, tmp_path_factory):
    """An uninterrupted run of the tiny config in gs://<bucket>/ref."""
    wd = f"gs://{gcs.bucket}/ref"
    cache = tmp_path_factory.mktemp("jax_cache")
    cmd, env = _cli(gcs, wd, cache)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return wd, cache


@pytest.mark.slow
def test_training_run_writes_every_file_to_the_bucket(gs_run):
    wd, _ = gs_run
    names = fileio.listdir(wd)
    for want in ("config.json", "train_config.json", "metrics.jsonl", "tensorboard", "checkpoints"):
        assert want in names, names
    steps = fileio.listdir(fileio.join(wd, "checkpoints"))  # the last `checkpoint.keep` steps
    assert str(STEPS) in steps and set(steps) <= {str(s) for s in range(2, STEPS + 1, 2)}, steps
    events = fileio.listdir(fileio.join(wd, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    assert fileio.path(fileio.join(wd, "tensorboard", events[0])).stat().length > 100
    assert sorted(_losses(wd)) == list(range(1, STEPS + 1))
    assert json.loads(fileio.read_text(fileio.join(wd, "config.json")))["model_type"] == "qwen"
    # Nothing went to a local directory named "gs:" (what open() and os.makedirs would do).
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.mark.slow
def test_sigkill_then_resume_from_the_bucket_is_bit_identical(gcs, gs_run, tmp_path):
    ref_wd, cache = gs_run
    ref = _losses(ref_wd)
    wd = f"gs://{gcs.bucket}/killed"
    cmd, env = _cli(gcs, wd, cache)
    # stderr to a file: Orbax's warnings on GCS fill a pipe that nobody reads until the kill.
    log = open(tmp_path / "killed.stderr", "w+")  # noqa: SIM115 - closed below
    # Held after step 3 (the barrier in the bucket) once step 2's checkpoint is complete (Orbax
    # writes commit_success.txt into a step on GCS last), then killed: it resumes from step 2.
    proc = subprocess.Popen([*cmd, "--config.pause_after_step=3"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    held = fileio.join(wd, "paused_at_step_3.process_0")
    committed = fileio.join(wd, "checkpoints", "2", "commit_success.txt")
    wait_until(lambda: fileio.exists(held) and fileio.exists(committed), [proc],
               "held at step 3 with step 2 saved", 600, log=log)  # fmt: skip
    proc.kill()
    proc.wait()
    log.close()
    killed_at = max(_losses(wd))
    assert killed_at == 3
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = done.stdout.decode()
    assert f"resumed from {wd}/checkpoints step 2" in out, out[-2000:]
    assert _losses(wd) == ref, (killed_at, _losses(wd), ref)


@pytest.mark.slow
def test_init_from_a_gcs_workdir_and_a_gcs_checkpoint(gcs, gs_run):
    from qwenvl_jax.convert import ours

    wd, _ = gs_run
    mcfg, prev = ckpt_lib.latest_params(wd, scan_layers=False)
    want = ckpt_lib.stack_layers(prev)

    c = train_config()
    c.init.workdir = wd
    got, desc = train.initial_params(train.build(c, jax.devices()[:1]))
    assert desc == f"previous stage {wd}"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)

    ckpt = f"gs://{gcs.bucket}/converted"
    ours.save_params(ckpt, prev, mcfg)
    assert ours.is_ours(ckpt)
    c = train_config()
    c.init.checkpoint = ckpt
    got, _ = train.initial_params(train.build(c, jax.devices()[:1]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)

    c = train_config()
    c.init.workdir = f"gs://{gcs.bucket}/no-such-run"
    with pytest.raises(FileNotFoundError, match="config.init.workdir='gs://"):
        train.initial_params(train.build(c, jax.devices()[:1]))


S = 28  # image side (2 x 14-pixel patches)


def test_pipeline_reads_json_and_images_from_the_bucket(gcs, tmp_path):
    local = tmp_path / "data"
    os.makedirs(local / "imgs")
    for i in range(4):
        Image.new("RGB", (30 + 5 * i, 40), (60 * i, 200 - 40 * i, 90)).save(local / f"imgs/{i}.png")
    chat = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "user", "value": f"Picture 1: <img>imgs/{i % 4}.png</img>\nWhat is {i}?"},
                {"from": "assistant", "value": "a square " * (1 + i % 3)},
            ],
        }
        for i in range(8)
    ]
    (local / "chat.json").write_text(json.dumps(chat))
    remote = f"gs://{gcs.bucket}/data"
    fileio.copy_tree(local, remote)
    assert fileio.listdir(fileio.join(remote, "imgs")) == [f"{i}.png" for i in range(4)]
    tok = QWenTokenizer()

    def batches(**source):
        c = pipeline.default_data_config()
        c.sources.chat = pipeline.source_config(task="chatml", **source)
        args = dict(seq_len=700, batch_size_per_host=2, image_size=S, max_images=3, seed=0)
        with pipeline.make_train_iterator(c, tok, **args) as it:
            out = [next(it) for _ in range(2)]
            assert it.metrics()["data/skipped"] == 0
        return out

    want = batches(path=str(local / "chat.json"))
    assert all(b["image_valid"].any() for b in want)
    # The JSON on GCS, images relative to its directory; then a local JSON, images on GCS.
    for got in (
        batches(path=f"{remote}/chat.json"),
        batches(path=str(local / "chat.json"), image_root=remote),
    ):
        for b, w in zip(got, want, strict=True):
            for k in w:
                np.testing.assert_array_equal(b[k], w[k], err_msg=k)
    # One image for inference, by its gs:// path.
    np.testing.assert_array_equal(
        qimage.load_image(f"{remote}/imgs/2.png", S),
        qimage.load_image(str(local / "imgs/2.png"), S),
    )


def test_gcs_path_without_gcsfs_is_one_line_error(monkeypatch):
    import importlib.util

    from qwenvl_jax.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a),
    )
    with pytest.raises(UserError, match=r"pip install 'qwenvl_jax\[gcs\]'"):
        fileio.exists("gs://bucket/run/config.json")
