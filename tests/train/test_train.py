"""Trainer: mesh invariance, resume after SIGKILL/SIGTERM, corrupted checkpoints, frozen params.

Everything runs the tiny model with a 1024-token vocabulary and 16 queries on random synthetic
batches (`data.kind="random"`), so each run compiles in tens of seconds on a CPU.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from held import wait_until
from paths import ROOT
from ports import free_port
from tiny import TINY_FLAGS, train_config

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import train
from qwenvl_jax.data.random_batches import RandomBatches
from qwenvl_jax.train import stage_config

absl_logging.set_verbosity(absl_logging.WARNING)

# Losses on different meshes differ only by the order of float32 reductions (measured ~3e-7
# relative after 3 Adam steps); 1e-5 leaves room without hiding a real sharding bug, which moves
# the loss by far more.
MESH_RTOL = 1e-5
SMALL = TINY_FLAGS


def load_config(name, arg="tiny"):
    return stage_config.load(f"{name}:{arg}" if arg else name)


def tiny(stage="multitask", steps=4, **kw):
    return train_config(stage, steps, **kw)


def losses_by_step(workdir):
    """Last logged loss of each step in metrics.jsonl (a restarted run re-logs repeated steps)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


_CACHE_DIR = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"qwenvl_test_train_jax_cache_{os.getpid()}"
)


@pytest.fixture(scope="module", autouse=True)
def _remove_compilation_cache():
    yield
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def cli(workdir, *extra, devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # Restarted runs reuse the compiled step (the same program) from a per-session cache.
    env["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [
        sys.executable, "-m", "qwenvl_jax.train", "--config=configs/multitask.py:tiny",
        f"--workdir={workdir}", "--config.steps=6", "--config.checkpoint.every_steps=2",
        "--config.log_every=1", "--config.model.overrides.visual.n_queries=16", *SMALL, *extra,
    ]  # fmt: skip
    return cmd, env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-device run of 6 steps (checkpoints at 2, 4, 6)."""
    wd = str(tmp_path_factory.mktemp("ref"))
    hist = train.train(tiny(steps=6), wd, devices=jax.devices()[:1])
    return wd, [r["loss"] for r in hist]


def test_loss_falls_and_metrics_logged(reference):
    wd, losses = reference
    assert len(losses) == 6 and losses[-1] < losses[0]
    rec = json.loads(open(os.path.join(wd, "metrics.jsonl")).readline())
    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "images_per_s", "model_tflops_per_s"):
        assert k in rec and np.isfinite(rec[k])
    assert rec["images_per_s"] > 0
    assert os.listdir(os.path.join(wd, "tensorboard"))
    assert ckpt_lib.Checkpointer(wd).all_steps() == [4, 6]  # keep = 2


@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param((8, 1, 1), marks=pytest.mark.slow),
        (2, 2, 2),
        pytest.param((1, 4, 2), marks=pytest.mark.slow),
    ],
)
def test_meshes_match_single_device(reference, mesh, tmp_path):
    _, ref = reference
    c = tiny(steps=6)
    c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh
    s = train.build(c)
    # Expected shardings under the default rules.
    sh = s.param_sharding
    d, f, m = mesh
    fs = "fsdp" if f > 1 else None
    md = "model" if m > 1 else None
    assert tuple(sh["lm_head"]["kernel"].spec) == (fs, md)
    assert tuple(sh["transformer"]["h"]["mlp"]["w1"]["kernel"].spec) == (None, fs, md)
    assert tuple(sh["transformer"]["h"]["attn"]["c_attn"]["kernel"].spec) == (
        None, fs, None, md, None
    )  # fmt: skip
    blk = sh["transformer"]["visual"]["transformer"]["resblocks"]
    assert tuple(blk["mlp"]["c_fc"]["kernel"].spec) == (None, fs, md)
    hist = train.train(c, str(tmp_path), stop_after=3)
    np.testing.assert_allclose([r["loss"] for r in hist], ref[:3], rtol=MESH_RTOL)


def test_optimizer_state_sharded_over_data():
    c = tiny()
    c.mesh.data, c.mesh.fsdp, c.mesh.model = (2, 2, 2)
    s = train.build(c)
    specs = [x.spec for x in jax.tree.leaves(s.opt_sharding)]
    big = [
        (x.shape, sp)
        for x, sp in zip(jax.tree.leaves(s.abstract_opt), specs, strict=True)
        if x.size >= 1024
    ]
    assert big and all("data" in str(sp) for _, sp in big), big


def test_large_replicated_param_fails():
    c = tiny()
    c.mesh.data, c.mesh.fsdp, c.mesh.model = (1, 4, 2)
    c.sharding.rules = [("vocab", None), ("embed", None)] + [
        (n, None)
        for n in (
            "mlp heads head_dim qkv layers vit_embed vit_mlp vit_heads patch channels queries "
            "norm act_batch act_seq act_embed act_heads act_mlp act_vocab"
        ).split()
    ]
    c.sharding.max_replicated_mb = 0.5
    s = train.build(c)
    with pytest.raises(ValueError, match="lm_head.kernel"):
        train.check_setup(s)


def test_corrupted_latest_checkpoint_falls_back(reference, tmp_path, caplog):
    wd, ref = reference
    work = str(tmp_path / "run")
    shutil.copytree(wd, work)
    os.remove(os.path.join(work, "metrics.jsonl"))
    # Corrupt step 6: truncate every array file of its params.
    for root, _, files in os.walk(os.path.join(work, "checkpoints", "6", "params")):
        for name in files:
            open(os.path.join(root, name), "wb").close()
    hist = train.train(tiny(steps=6), work, devices=jax.devices()[:1])
    assert "checkpoint step 6" in caplog.text and "unreadable" in caplog.text
    assert [r["step"] for r in hist] == [5, 6]
    assert [r["loss"] for r in hist] == ref[4:6]  # bit-exact continuation from step 4
    q = os.listdir(os.path.join(work, ckpt_lib.QUARANTINE_DIR))
    assert any(n.startswith("6.") and not n.endswith(".txt") for n in q)


def test_all_checkpoints_unreadable_is_an_error(reference, tmp_path):
    wd, _ = reference
    work = str(tmp_path / "run")
    shutil.copytree(wd, work)
    for step in ("4", "6"):
        shutil.rmtree(os.path.join(work, "checkpoints", step, "opt_state"))
    with pytest.raises(RuntimeError, match="Refusing to start from scratch"):
        train.train(tiny(steps=6), work, devices=jax.devices()[:1])


def test_frozen_llm_bit_identical_and_vit_trains(tmp_path):
    c = tiny("pretrain", steps=3)
    c.checkpoint.every_steps = 100
    s = train.build(c, jax.devices()[:1])
    init = jax.device_get(train.init_params(s, int(c.seed)))
    train.train(c, str(tmp_path), devices=jax.devices()[:1])
    cfg, final = ckpt_lib.latest_params(str(tmp_path), scan_layers=True)
    assert cfg.hidden_size == 256
    frozen = trained = 0
    for (path, a), (_, b), lab in zip(
        _flat(init), _flat(final), jax.tree.leaves(s.labels), strict=True
    ):
        if lab == "frozen":
            np.testing.assert_array_equal(a, b, err_msg=path)
            frozen += 1
        elif path.startswith("transformer.visual.transformer."):
            assert not np.array_equal(a, b), path
            trained += 1
    assert frozen > 10 and trained > 5


def _flat(tree):
    from qwenvl_jax import tree as tree_lib

    return [(p, np.asarray(x)) for p, x in tree_lib.flatten(tree).items()]


def test_latest_params_unstacks_to_per_layer_keys(reference):
    wd, _ = reference
    _, params = ckpt_lib.latest_params(wd, scan_layers=False)
    assert sorted(params["transformer"]["h"]) == [0, 1]
    assert params["transformer"]["h"][1]["mlp"]["w1"]["kernel"].shape == (256, 512)


@pytest.mark.slow
def test_sigkill_then_restart_matches_uninterrupted(tmp_path):
    ref_wd = str(tmp_path / "uninterrupted")
    cmd, env = cli(ref_wd)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    ref = [losses_by_step(ref_wd)[i] for i in range(1, 7)]
    wd = str(tmp_path / "run")
    cmd, env = cli(wd)
    # Held after step 5 (before its checkpoint) once step 4's checkpoint is complete, then killed:
    # the restart must resume from step 4 and replay step 5's batch and update exactly.
    proc = subprocess.Popen([*cmd, "--config.pause_after_step=5"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    held = os.path.join(wd, "paused_at_step_5.process_0")
    step4 = os.path.join(wd, "checkpoints", "4")  # Orbax renames a step's folder when complete
    wait_until(lambda: os.path.exists(held) and os.path.isdir(step4), [proc], "held at step 5")
    proc.kill()
    proc.wait()
    assert max(losses_by_step(wd)) == 5
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert f"resumed from {os.path.join(wd, 'checkpoints')} step 4" in done.stdout.decode()
    got = losses_by_step(wd)
    assert [got[i] for i in range(1, 7)] == ref, (got, ref)


@pytest.mark.slow
def test_sigterm_checkpoints_before_exit(tmp_path):
    wd = str(tmp_path / "run")
    cmd, env = cli(wd, "--config.checkpoint.every_steps=1000", "--config.steps=50",
                   "--config.pause_after_step=2")  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    held = os.path.join(wd, "paused_at_step_2.process_0")
    wait_until(lambda: os.path.exists(held), [proc], "held at step 2")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert "SIGTERM" in err.decode()
    # Only the SIGTERM saves step 2 (checkpoints are every 1000 steps); nothing ran after it.
    assert ckpt_lib.Checkpointer(wd).all_steps() == [2]
    assert max(losses_by_step(wd)) == 2
    assert not os.path.exists(held)


@pytest.mark.slow
def test_two_processes_train_together(reference, tmp_path):
    """Two jax.distributed processes on 127.0.0.1 (2 CPU devices each) vs one device."""
    _, ref = reference
    wd = str(tmp_path / "run")
    port = free_port()
    procs = []
    for pid in range(2):
        cmd, env = cli(
            wd, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.steps=6",
            devices=2,
        )  # fmt: skip
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
    got = losses_by_step(wd)
    np.testing.assert_allclose([got[i] for i in range(1, 7)], ref, rtol=MESH_RTOL)
    # Both processes printed the same progress (process 0 only prints; process 1 is silent).
    assert b"step 6/6" in outs[0][0] and b"step 6/6" not in outs[1][0]
    # The 2-host, 4-device checkpoint resumes on one host with one device.
    hist = train.train(tiny(steps=8), wd, devices=jax.devices()[:1])
    assert [r["step"] for r in hist] == [7, 8]
    assert all(np.isfinite(r["loss"]) for r in hist)


@pytest.fixture(scope="module")
def reference_12_losses(tmp_path_factory):
    """The losses of an uninterrupted single-device run of 12 steps."""
    wd = str(tmp_path_factory.mktemp("ref12"))
    return [r["loss"] for r in train.train(tiny(steps=12), wd, devices=jax.devices()[:1])]


@pytest.mark.slow
@pytest.mark.parametrize("service", [True, False], ids=["preemption_service", "allgather_every_2"])
def test_sigterm_on_one_of_two_processes(tmp_path, service, reference_12_losses):
    """SIGTERM to one of two jax.distributed processes: both checkpoint the same step and exit 0,
    and the resumed pair continues exactly as an uninterrupted run (within the mesh tolerance).

    `service`: JAX's preemption sync point (no collective per step); otherwise the SIGTERM flags
    are all-gathered every 2 steps (`checkpoint.preemption_check_every`)."""
    steps, every = 12, 2
    wd = str(tmp_path / "run")
    port = free_port()

    def launch(port, *extra):
        procs = []
        for pid in range(2):
            cmd, env = cli(
                wd, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
                "--config.mesh.data=2", "--config.mesh.fsdp=2", f"--config.steps={steps}",
                "--config.checkpoint.every_steps=1000",
                f"--config.checkpoint.preemption_check_every={every}", *extra, devices=2,
            )  # fmt: skip
            env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
            env["JAX_ENABLE_PREEMPTION_SERVICE"] = "true" if service else "false"
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE))  # fmt: skip
        return procs

    # Both processes hold after step 2 (before its preemption check); process 1 gets SIGTERM.
    procs = launch(port, "--config.pause_after_step=2")
    held = [os.path.join(wd, f"paused_at_step_2.process_{i}") for i in range(2)]
    wait_until(lambda: all(map(os.path.exists, held)), procs, "both held at step 2", 400)
    procs[1].send_signal(signal.SIGTERM)
    if not service:
        # Process 1's handler set its flag: it removes its file and waits in the all-gather.
        wait_until(lambda: not os.path.exists(held[1]), procs, "process 1 saw SIGTERM")
    # With the service the notice travels through JAX's coordination service in the background
    # (ms), while 10 steps remain; the sync point is one past the furthest process's step.
    for f in held:
        if os.path.exists(f):
            os.remove(f)
    errs = [p.communicate(timeout=400)[1].decode() for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert all("checkpointed step" in err for err in errs), errs[0][-2000:]
    last = max(losses_by_step(wd))
    assert ckpt_lib.Checkpointer(wd).all_steps() == [last]
    assert 2 <= last < steps, last
    if not service:
        assert last == 2  # the flags are all-gathered at step 2, after process 1's was set
    for p in launch(free_port()):
        err = p.communicate(timeout=400)[1].decode()
        assert p.returncode == 0, err[-3000:]
    got = losses_by_step(wd)
    np.testing.assert_allclose(
        [got[i] for i in range(1, steps + 1)], reference_12_losses, rtol=MESH_RTOL
    )


def _has_libtpu():
    try:
        import libtpu  # noqa: F401

        return True
    except ImportError:
        return False


def _tpu_aot_result(code: str, timeout: int):
    """Runs `code` (which prints "RESULT <json>") in a CPU process that compiles for a TPU
    topology with libtpu, and returns the JSON."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TPU_WORKER_HOSTNAMES="localhost",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    line = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("RESULT")][0]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu not installed (pip install -e .[tpu])")
def test_tiny_aot_compile_for_tpu_slice():
    code = (
        "import json;"
        "from qwenvl_jax import train;"
        "from qwenvl_jax.train import stage_config;"
        "c=stage_config.load('multitask:tiny');c.aot.topology='v5p:2x2x1';c.mesh.data=1;c.mesh.fsdp=2;"
        "c.mesh.model=2;c.model.dtype='bfloat16';"
        "print('RESULT', json.dumps(train.dry_run(c)))"
    )
    res = _tpu_aot_result(code, timeout=600)
    assert res["mesh"] == {"data": 1, "fsdp": 2, "model": 2}
    # Compiled per-device memory holds at least this device's params and optimizer state.
    assert res["argument_size_in_bytes"] >= res["param_bytes"] + res["opt_bytes"]
    assert 0 < res["peak_estimate_bytes"] < 4 * 2**30
    assert res["xla_flops_per_device_loop_bodies_once"] > 0
    # The trainer's TPU flags reach the AOT compile: parameter all-gathers run asynchronously.
    assert res["program"]["splash_attention"] and res["program"]["pallas_calls"] >= 3
    assert res["program"]["collectives_by_op"]["all-gather"]["async"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu not installed (pip install -e .[tpu])")
def test_tiny_aot_compile_for_tpu_uses_splash_attention():
    """attn_impl="auto" compiled for a TPU slice (on this CPU host) calls the splash kernel: the
    decoder's 128-token rows go through Pallas (TPU custom calls for the forward and the two
    backward kernels) inside the shard_map over (fsdp, model)."""
    code = (
        "import json;"
        "from qwenvl_jax import train;"
        "from qwenvl_jax.train import aot, stage_config;"
        "c=stage_config.load('multitask:tiny');c.aot.topology='v5p:2x2x1';c.mesh.data=1;"
        "c.mesh.fsdp=2;c.mesh.model=2;c.model.dtype='bfloat16';c.model.attn_impl='auto';"
        "txt=aot.aot_compile(train.build(c, aot.topology_devices(c))).as_text();"
        "print('RESULT', json.dumps([txt.count('tpu_custom_call'), 'splash' in txt]))"
    )
    n_calls, has_splash = _tpu_aot_result(code, timeout=900)
    assert n_calls >= 3 and has_splash


def test_chunked_loss_equals_full_loss():
    """The chunked LM head + log-softmax gives the same loss and gradients as the full one."""
    c = tiny(steps=4)
    s = train.build(c, jax.devices()[:1])
    params = train.init_params(s, 0)
    it = RandomBatches(c, s.mcfg, 4, 0)
    mb = jax.tree.map(lambda x: x[0], train.to_step_batch(next(it), s))

    def loss(p, chunk):
        total, n, _ = train.cross_entropy_sum(train.merge_model(s, p), mb, chunk)
        return total / n

    full, g_full = jax.jit(jax.value_and_grad(lambda p: loss(p, 0)))(params)
    chunked, g_chunk = jax.jit(jax.value_and_grad(lambda p: loss(p, 32)))(params)
    # Same float32 terms summed in a different order: agreement to float32 rounding.
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="not a multiple of loss_chunk"):
        loss(params, 48)


def test_init_sources_previous_workdir_checkpoint_and_towers(reference, tmp_path):
    from qwenvl_jax.convert import hf, ours

    wd, _ = reference
    mcfg, prev = ckpt_lib.latest_params(wd, scan_layers=False)
    # 1. a previous stage's workdir
    c = tiny(steps=4)
    c.init.workdir = wd
    s = train.build(c, jax.devices()[:1])
    got, desc = train.initial_params(s)
    assert "previous stage" in desc
    want = ckpt_lib.stack_layers(prev)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    # 2. a converted checkpoint (saved per-layer, loaded into the stacked run layout)
    ours.save_params(str(tmp_path / "ckpt"), prev, mcfg)
    c = tiny(steps=4)
    c.init.checkpoint = str(tmp_path / "ckpt")
    got, _ = train.initial_params(train.build(c, jax.devices()[:1]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    # 2b. config.init.checkpoint also takes a workdir and an HF checkpoint (converted in memory)
    hf.export_hf(prev, mcfg, str(tmp_path / "hf"), tokenizer=None)
    for path in (wd, str(tmp_path / "hf")):
        c = tiny(steps=4)
        c.init.checkpoint = path
        got, _ = train.initial_params(train.build(c, jax.devices()[:1]))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    # 3. separate towers: the ViT trunk from one checkpoint, the LLM from another, adapter random
    c = tiny(steps=4)
    c.init.vit_checkpoint = c.init.llm_checkpoint = str(tmp_path / "ckpt")
    s = train.build(c, jax.devices()[:1])
    got = jax.device_get(train.initial_params(s)[0])
    rand = jax.device_get(train.init_params(s, int(c.seed)))
    for (path, g), (_, w), (_, r) in zip(_flat(got), _flat(want), _flat(rand), strict=True):
        from_ckpt = not path.startswith("transformer.visual.attn_pool.")
        np.testing.assert_array_equal(g, w if from_ckpt else r, err_msg=path)
    # 4. nothing named and random init not allowed
    c = tiny(steps=4)
    c.init.allow_random = False
    with pytest.raises(ValueError, match="names no weights"):
        train.initial_params(train.build(c, jax.devices()[:1]))


def test_dry_run_7b_without_allocating(capsys):
    c = load_config("multitask", None)
    c.aot.slice = "local"  # the 8 fake CPU devices (the stage's own slice: test_aot.py)
    out = train.dry_run(c)
    printed = capsys.readouterr().out
    assert "9,656,935,168" in printed  # the published Qwen-VL parameter count
    # mesh.model "auto" with no device memory to fit: 1, nothing compiled (train/model_axis.py)
    assert out["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
    assert "config.mesh.model=auto: 1 (no device memory to fit)" in printed
    # f32 master weights split 8 ways (a few small norms/biases are replicated: under 1 %)
    np.testing.assert_allclose(out["param_bytes"], 9_656_935_168 * 4 / 8, rtol=0.01)
    np.testing.assert_allclose(out["opt_bytes"], 2 * out["param_bytes"], rtol=0.01)


def test_vit_layer_lr_scales_on_the_real_stacked_model():
    from qwenvl_jax import optim

    s = train.build(tiny(), jax.devices()[:1])
    scales = optim.vit_lr_scales(s.abstract_params, 0.95)
    blk = scales["transformer"]["visual"]["transformer"]["resblocks"]
    kernel = blk["attn"]["in_proj"]["kernel"]  # [L=2, W, N, 3, H]
    assert kernel.shape == (2, 1, 1, 1, 1)
    np.testing.assert_allclose(np.ravel(kernel), [0.95**2, 0.95**1], rtol=1e-6)
    assert scales["transformer"]["visual"]["conv1"]["kernel"] == pytest.approx(0.95**3)
    assert scales["transformer"]["h"]["mlp"]["w1"]["kernel"] == 1.0
    assert scales["transformer"]["visual"]["attn_pool"]["query"] == 1.0


def test_group_lr_scale_reaches_the_train_step():
    """optim.lr_scale multiplies the adapter's first Adam step by exactly its factor and leaves
    every other parameter's step as it is."""
    setups = []
    for scale in ({}, {"adapter": 0.25}):
        c = tiny(steps=4, batch_size=2)
        c.optim.weight_decay = 0.0
        c.optim.lr_scale = scale
        setups.append((train.build(c, jax.devices()[:1]), c))
    (s0, c0), (s1, _) = setups
    local = next(RandomBatches(c0, s0.mcfg, 2, 0))
    assert local["images"].any()
    p0 = jax.device_get(train.init_params(s0, 0))
    deltas = []
    for s in (s0, s1):
        params = jax.device_put(p0, s.param_sharding)
        opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
        p, _, _ = train.make_train_step(s)(params, opt, train.to_step_batch(local, s))
        deltas.append(
            jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(p), p0)
        )
    flat0 = dict(jax.tree_util.tree_flatten_with_path(deltas[0])[0])
    flat1 = dict(jax.tree_util.tree_flatten_with_path(deltas[1])[0])
    n_adapter = 0
    for path, d0 in flat0.items():
        name = jax.tree_util.keystr(path)
        factor = 0.25 if "attn_pool" in name and "pos_embed" not in name else 1.0
        n_adapter += factor != 1.0
        np.testing.assert_allclose(
            flat1[path],
            factor * d0,
            rtol=1e-4,
            atol=3e-7,  # p_new - p0 in float32: a few ulp of the LayerNorm scales (~1)
            err_msg=name,
        )
    assert n_adapter >= 8  # query, kv_proj, ln_q, ln_kv, in/out projections


def test_grad_accumulation_normalises_by_all_supervised_tokens():
    """Loss and update = the mean over every supervised token of the global batch, whatever the
    split into micro-batches; the micro-batches here hold 60 and 3 supervised tokens, so a mean of
    micro-batch means would differ (checked below)."""
    import jax.numpy as jnp

    def setup(accum):
        c = tiny(steps=4, grad_accum=accum, batch_size=4)
        c.data.max_images, c.data.seq_len, c.mesh.data = 0, 32, 1
        return train.build(c, jax.devices()[:1]), c

    (s1, c1), (s2, _) = setup(1), setup(2)
    local = next(RandomBatches(c1, s1.mcfg, 4, 0))
    mask = np.zeros((4, 32), np.float32)
    mask[:2, :30] = 1.0  # micro-batch 0 (rows 0-1): 60 tokens
    mask[2:, 5] = mask[3, 9] = 1.0  # micro-batch 1 (rows 2-3): 3 tokens
    local["loss_mask"] = mask
    p0 = jax.device_get(train.init_params(s1, 0))
    # Hand calculation from the model's logits in float64.
    logits = train.merge_model(s1, p0)(
        jnp.asarray(local["input_ids"]),
        segment_ids=jnp.asarray(local["segment_ids"]),
        positions=jnp.asarray(local["positions"]),
    )
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    ce = lse - np.take_along_axis(logits, local["targets"][..., None], -1)[..., 0]
    want = (ce * mask).sum() / mask.sum()
    mean_of_means = np.mean(
        [(ce[i] * mask[i]).sum() / mask[i].sum() for i in (slice(0, 2), slice(2, 4))]
    )
    assert abs(mean_of_means - want) > 1e-3 * want  # the batch tells the two apart
    got = []
    for s in (s1, s2):
        params = jax.device_put(p0, s.param_sharding)
        opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
        p, _, m = train.make_train_step(s)(params, opt, train.to_step_batch(local, s))
        assert float(m["supervised_tokens"]) == 63.0
        # float32 forward vs the float64 hand sum over 63 terms
        np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
        got.append(jax.device_get(p))
    # One Adam step: the update is sign-like, so equal gradients give equal params; float32
    # summation order only moves them at rounding level.
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_init_path_and_dtype_name_the_config_key(tmp_path):
    for key in ("workdir", "checkpoint", "vit_checkpoint"):
        c = tiny(steps=4)
        c.init[key] = str(tmp_path / "missing")
        with pytest.raises(FileNotFoundError, match=f"config.init.{key}="):
            train.initial_params(train.build(c, jax.devices()[:1]))
    c = tiny(steps=4)
    c.init.workdir = str(tmp_path)  # exists, but holds no training run
    with pytest.raises(FileNotFoundError, match="config.init.workdir=.*not a training workdir"):
        train.initial_params(train.build(c, jax.devices()[:1]))
    c = tiny(steps=4)
    c.model.dtype = "bf16"
    with pytest.raises(ValueError, match="config.model.dtype='bf16'"):
        train.build(c, jax.devices()[:1])


_MULTIHOST_INIT = """
import sys
import jax
import numpy as np
pid, port, wd, ours_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
sys.path[:0] = ["tests", "tests/train"]
from test_train import _flat, _flat_arrays, tiny
from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import train
want = ckpt_lib.stack_layers(ckpt_lib.latest_params(wd, scan_layers=False)[1])
for key, path in (("workdir", wd), ("vit_checkpoint", ours_dir)):
    c = tiny(steps=4)
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, 4, 1
    c.init[key] = path
    got, _ = train.initial_params(train.build(c))
    for (p, g), (_, w) in zip(_flat_arrays(got), _flat(want), strict=True):
        if key == "workdir" or p.startswith("transformer.visual.transformer."):
            for shard in g.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index], err_msg=p)
print("MULTIHOST_INIT_OK", pid)
"""


def _flat_arrays(tree):
    from qwenvl_jax import tree as tree_lib

    return list(tree_lib.flatten(tree).items())


def test_init_sources_on_two_processes(reference, tmp_path):
    """A previous workdir and a tower checkpoint load onto a mesh spanning two processes (each
    process holds only its shards; nothing may fetch arrays from the other host)."""
    from qwenvl_jax.convert import ours

    wd, _ = reference
    mcfg, prev = ckpt_lib.latest_params(wd, scan_layers=False)
    ours.save_params(str(tmp_path / "ckpt"), prev, mcfg)
    port = str(free_port())
    code = _MULTIHOST_INIT
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        cmd = [sys.executable, "-c", code, str(pid), port, wd, str(tmp_path / "ckpt")]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for pid, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"MULTIHOST_INIT_OK {pid}" in out.decode(), err.decode()[
            -3000:
        ]


def test_pipeline_batches_follow_the_adapter_query_count(tmp_path):
    # A model with 16 adapter queries gets 16-position image spans from the real data pipeline.
    from PIL import Image

    from qwenvl_jax.data import pipeline

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    turns = [{"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat colour is it?"},
             {"from": "assistant", "value": "red"}]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps([{"id": str(k), "conversations": turns}
                                                 for k in range(6)]))  # fmt: skip
    c = tiny(steps=4)
    c.model.overrides.vocab_size = 151936  # the published tokenizer's ids
    c.model.overrides.visual = {"n_queries": 16, "image_start_id": 151857}
    c.data.kind = "pipeline"
    c.data.seq_len = 64
    c.data.max_images = 2
    c.data.spec = pipeline.default_data_config()
    c.data.spec.sources["d"] = pipeline.source_config(kind="json", path=str(tmp_path / "d.json"))
    s = train.build(c, jax.devices()[:1])
    batch = next(iter(train.make_data_iterator(c, s.mcfg, 2)))
    for row, index in zip(batch["input_ids"], batch["image_token_index"], strict=True):
        starts = np.flatnonzero(row == 151857)
        assert len(starts) >= 1
        for m, a in enumerate(starts):
            assert row[a + 17] == 151858  # </img> right after 16 inner positions
            assert index[a + 1 : a + 17].tolist() == list(range(16 * m, 16 * m + 16))
        assert (index >= 0).sum() == 16 * len(starts)


def test_image_budget_overflow_stops_naming_the_config_key():
    """A micro-batch with more images on a data shard than `data.image_budget` allows stops the
    step before it runs (the budgeted ViT would drop them); within the budget it passes, and
    the step's model FLOPs count the budget instead of every slot."""
    from qwenvl_jax.train.state import encoded_images, step_model_flops
    from qwenvl_jax.train.step import check_image_budget, image_budget_of

    s_all = train.build(tiny(steps=4, **{"data.max_images": 2}), jax.devices()[:2])
    # 2 data shards, 2 micro-batches of 8 rows; per micro-batch 8 images: 4 of a shard's 8 slots.
    c = tiny(steps=4, **{"data.max_images": 2, "data.image_budget": 8})
    s = train.build(c, jax.devices()[:2])
    assert image_budget_of(s) == (4, 2)
    assert encoded_images(s) == 16 < encoded_images(s_all) == 32
    assert step_model_flops(s) < step_model_flops(s_all)
    valid = np.zeros((16, 2), bool)  # rows 0-7 micro-batch 0, rows 8-15 micro-batch 1
    valid[8:12, 0] = True  # micro-batch 1, shard 0: 4 images (rows 8-11)
    check_image_budget(valid, s)
    valid[11, 1] = True  # 5 images on that shard
    with pytest.raises(ValueError, match=r"micro-batch 1 holds 5 images.*config.data.image_budget"):
        check_image_budget(valid, s)
    check_image_budget(valid, s_all)  # no budget: every slot is encoded
    c = tiny(steps=4, **{"data.max_images": 2, "data.image_budget": 5})
    with pytest.raises(ValueError, match="not a multiple of the data-parallel size"):
        image_budget_of(train.build(c, jax.devices()[:2]))
