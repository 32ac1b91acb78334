"""The trainer's config checked before any work (issue 24, item 6; qwenvl_jax/train/validate.py):
each rule is one exact line naming the `--config` key (or `--workdir`) and what is allowed; through
the command line, `error: <line>` and exit 2 with no traceback and nothing written."""

import os
import shutil
import subprocess
import sys

import pytest
from paths import ROOT
from tiny import set_keys

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import stage_config
from qwenvl_jax.train.validate import validate


def tiny(spec="multitask:tiny", **values):
    return set_keys(stage_config.load(spec), **values)


def message(cfg, **kw) -> str:
    kw.setdefault("process_count", 1)
    with pytest.raises(ConfigError) as e:
        validate(cfg, **kw)
    return str(e.value)


@pytest.mark.parametrize("spec", ["pretrain", "multitask", "sft", "sft:lora", "sft:qlora",
                                  "pretrain:tiny", "multitask:tiny", "sft:tiny", "sft:tiny,lora",
                                  "multitask:data=random"])  # fmt: skip
def test_every_shipped_config_passes(spec):
    validate(stage_config.load(spec), process_count=1)  # the 7B meshes are checked per slice
    if "tiny" in spec or "lora" in spec or spec.startswith("pretrain"):
        validate(stage_config.load(spec), devices=1, process_count=1)


RANGES = [
    ("steps", 0, "an integer >= 1"),
    ("batch_size", 0, "an integer >= 1 (global sequences per optimizer step)"),
    ("batch_size", -4, "an integer >= 1 (global sequences per optimizer step)"),
    ("grad_accum", 0, "an integer >= 1"),
    ("device_batch", -1, "an integer >= 0 (0: use --config.grad_accum as given)"),
    ("log_every", 0, "an integer >= 1"),
    ("checkpoint.every_steps", 0, "an integer >= 1"),
    ("checkpoint.keep", 0, "an integer >= 1"),
    ("checkpoint.preemption_check_every", 0, "an integer >= 1"),
    ("eval.every_steps", 0, "an integer >= 1"),
    ("eval.batches", 0, "an integer >= 1"),
    ("optim.warmup_steps", -1, "an integer >= 0"),
    ("optim.lr", 0.0, "a number > 0"),
    ("optim.lr", float("nan"), "a number > 0"),
    ("optim.lr", float("inf"), "a number > 0"),
    ("optim.min_lr", -1e-6, "a number >= 0"),
    ("optim.b2", 1.0, "a number in [0, 1)"),
    ("optim.eps", 0.0, "a number > 0"),
    ("optim.grad_clip", -1.0, "a number >= 0 (0: no clipping)"),
    ("optim.vit_lr_decay", 0.0, "a number in (0, 1] (1: no decay)"),
    ("mesh.model", 0, "an integer >= 1, -1 (the devices left) or auto"),
    ("data.seq_len", 0, "an integer >= 1"),
    ("data.image_budget", -2, "an integer >= 0 (0: every slot)"),
    ("loss_chunk", -1, "an integer >= 0 (0: all positions at once)"),
    ("seed", -1, "an integer >= 0"),
]


@pytest.mark.parametrize("key,value,allowed", RANGES, ids=[f"{k}={v}" for k, v, _ in RANGES])
def test_a_value_out_of_range_is_one_line_naming_the_key_and_the_range(key, value, allowed):
    assert message(tiny(**{key: value})) == f"--config.{key}={value!r}: must be {allowed}"


def test_lr_scale_multipliers_are_positive():
    c = tiny()
    c.optim.lr_scale = {"adapter": 0.0}
    assert message(c) == (
        "--config.optim.lr_scale.adapter=0.0: must be a number > 0 (to stop a group from"
        " training, list it in --config.optim.freeze)"
    )


def test_warmup_ends_before_the_schedule():
    # Today's run died in optim.lr_schedule with a ValueError traceback.
    assert message(tiny(**{"steps": 20, "optim.warmup_steps": 20})) == (
        "--config.optim.warmup_steps=20: must be < --config.steps=20 (the warm-up has to end"
        " before the learning-rate schedule does)"
    )
    c = tiny(**{"optim.warmup_steps": 30})
    c.optim.total_steps = 30  # set on its own, it is the key to name
    assert message(c).startswith("--config.optim.warmup_steps=30: must be < --config.optim.total")
    validate(tiny(**{"steps": 3, "optim.warmup_steps": 2}), process_count=1)


def test_cross_field_rules():
    assert message(tiny(**{"optim.lr": 1e-4, "optim.min_lr": 1e-3})) == (
        "--config.optim.min_lr=0.001: must be <= --config.optim.lr=0.0001 (the schedule decays"
        " from lr to min_lr)"
    )
    assert message(tiny(loss_chunk=48)) == (
        "--config.loss_chunk=48: must divide --config.data.seq_len=128 (or be 0: all positions"
        " at once)"
    )
    assert message(tiny(batch_size=16), process_count=3) == (
        "--config.batch_size=16: must be a multiple of the 3 processes (each reads batch_size /"
        " processes sequences)"
    )


def test_the_batch_splits_over_the_mesh_into_micro_batches():
    # 8 devices on the data axis, 2 micro-batches: 12 / 2 = 6 rows cannot go to 8 shards.
    assert message(tiny(batch_size=12, grad_accum=2), devices=8) == (
        "--config.batch_size=12: must be a multiple of --config.grad_accum=2 x the data-parallel"
        " size data x fsdp = 8 (a whole number of sequences per micro-batch on every data shard)"
    )
    validate(tiny(batch_size=16, grad_accum=2), devices=8, process_count=1)
    assert message(tiny(batch_size=12, device_batch=2), devices=4) == (
        "--config.batch_size=12: must be a multiple of --config.device_batch=2 x the data-parallel"
        " size data x fsdp = 4 (or set --config.device_batch=0 and --config.grad_accum)"
    )
    c = tiny(**{"data.image_budget": 5, "data.max_images": 2, "grad_accum": 1})
    assert message(c, devices=2) == (
        "--config.data.image_budget=5: must be a multiple of the data-parallel size data x fsdp"
        " = 2 (each shard encodes budget / 2 images), or 0"
    )


def test_the_mesh_fits_the_devices_with_a_hint():
    # The 7B fine-tuning stage with Table 8's model axis of 2 ("auto" would take 1 here) on one
    # GPU: the fix is a model axis of 1, or LoRA.
    assert message(tiny("sft", **{"mesh.model": 2}), devices=1) == (
        "--config.mesh.model=2: a model axis of 2 does not fit the 1 device of this run (data=1,"
        " fsdp=-1, model=2); use --config.mesh.model=1, or the LoRA variant"
        " (--config=configs/sft.py:lora), whose frozen base fits one device"
    )
    assert message(tiny("multitask", **{"mesh.model": 2}), devices=3) == (
        "--config.mesh.model=2: a model axis of 2 does not fit the 3 devices of this run (data=1,"
        " fsdp=-1, model=2); use --config.mesh.model=1"
    )
    assert message(tiny(**{"mesh.data": 3}), devices=8) == (
        "--config.mesh: data=3, fsdp=1, model=1 does not fit the 8 devices of this run: the"
        " product must be 8, or one axis -1 (the devices left)"
    )
    assert message(tiny(**{"mesh.fsdp": -1}), devices=8) == (
        "--config.mesh: data=-1, fsdp=-1, model=1: at most one axis may be -1 (the devices left)"
    )


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot create files in: mode 0555, or (as root, who ignores
    modes) the immutable attribute; skipped where neither holds."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    if os.access(d, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    try:
        (d / "probe").touch()
    except OSError:
        yield d
    else:
        (d / "probe").unlink()
        pytest.skip("cannot make a directory read-only here (root without chattr +i)")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o755)


def test_a_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, read_only_dir):
    f = tmp_path / "file"
    f.write_text("x")
    assert message(tiny(), workdir=str(f)) == (
        f"--workdir={f} is a file, not a directory; give a directory (it is created if missing)"
    )
    assert message(tiny(), workdir=str(f / "sub")) == (
        f"--workdir={f / 'sub'}: {f} is a file, not a directory; give a directory (it is created"
        " if missing)"
    )
    assert message(tiny(), workdir=str(read_only_dir)) in (
        f"--workdir={read_only_dir} is not writable ({why}); give a directory this process can"
        " create files in"
        for why in ("Permission denied", "Operation not permitted")
    )
    assert os.listdir(read_only_dir) == []
    new = tmp_path / "a" / "b"
    validate(tiny(), workdir=str(new), process_count=1)  # checked through tmp_path, not created
    assert not (tmp_path / "a").exists()
    validate(tiny(), workdir="gs://bucket/run", process_count=1)  # not probed


def test_train_stops_before_any_work(tmp_path):
    from qwenvl_jax.train import train

    wd = tmp_path / "wd"
    with pytest.raises(ConfigError, match=r"^--config\.log_every=0: must be an integer >= 1$"):
        train(tiny(log_every=0), str(wd))
    assert not wd.exists()  # nothing read, built or written


def _cli(*args, devices=8):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "qwenvl_jax.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_through_the_command_line_exit_2_one_line_no_traceback(tmp_path):
    tiny_cfg = "--config=configs/multitask.py:tiny"
    runs = {  # started together: the interpreter start-ups overlap
        "warmup": (
            _cli(tiny_cfg, f"--workdir={tmp_path / 'w1'}", "--config.optim.warmup_steps=20"),
            "--config.optim.warmup_steps=20: must be < --config.steps=20 (the warm-up has to end"
            " before the learning-rate schedule does)",
        ),
        "mesh": (
            _cli(
                "--config=configs/sft.py",
                "--config.mesh.model=2",
                f"--workdir={tmp_path / 'w2'}",
                devices=1,
            ),
            "--config.mesh.model=2: a model axis of 2 does not fit the 1 device of this run"
            " (data=1, fsdp=-1, model=2); use --config.mesh.model=1, or the LoRA variant"
            " (--config=configs/sft.py:lora), whose frozen base fits one device",
        ),
        "dry run": (
            _cli(tiny_cfg, "--dry_run", "--config.batch_size=0"),
            "--config.batch_size=0: must be an integer >= 1 (global sequences per optimizer step)",
        ),
    }
    for name, (proc, line) in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-3000:])
        assert err.strip().splitlines() == [f"error: {line}"], (name, err[-3000:])
        assert "Traceback" not in out + err
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
