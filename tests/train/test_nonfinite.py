"""Finite training (issue 24 item 2): a non-finite step is never applied, it is counted in the
optimizer state, and the `config.optim.nonfinite` policy stops the run with one line, exit 2,
before any checkpoint after the step.

The runs use the tiny model without images at 32 tokens, 2 sequences a step (one compile of the
step, ~20 s on a 2-core CPU, shared by the command-line runs through a compilation cache), and a
learning rate of 1e12: step 1 is finite, its update blows the parameters up, and from step 2 on
every loss is NaN.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import optim, train
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.train import stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The small run, as config keys (in process) and as the command line's overrides.
SMALL = {
    "model.overrides.vocab_size": 1024,
    "model.overrides.visual.n_queries": 16,
    "model.overrides.visual.image_start_id": 1000,
    "data.max_images": 0,
    "data.seq_len": 32,
    "batch_size": 2,
    "grad_accum": 1,
    "steps": 4,
    "log_every": 1,
    "checkpoint.every_steps": 1,
}
BLOWUP = {"optim.lr": 1e12}

# What the trainer printed at commit 91918ba, before non-finite steps were handled (code outside
# this change: `git archive 91918ba`, run with these configs). The finite path must not change; on
# this machine the new step reproduces them bit for bit. 1e-6 relative leaves room for another
# CPU's float32 reduction order only (a changed update moves the numbers by far more).
GOLDEN_RTOL = 1e-6
# The first 3 steps of `small(steps=3)` (the tiny stage's LR, 1e-3).
GOLDEN = {
    "loss": [6.991387844085693, 6.855072498321533, 6.749687671661377],
    "grad_norm": [6.345323085784912, 6.146039009094238, 6.432923316955566],
    "lr": [0.0005000000237487257, 0.0010000000474974513, 9.999999747378752e-05],
}
# Step 1 of the LR 1e12 run (the old trainer went on: step 2's loss and parameters were NaN).
GOLDEN_BLOWUP_STEP1 = {
    "loss": 6.991387844085693,
    "grad_norm": 6.345323085784912,
    "param_norm": 612638765613056.0,
    "lr": 499999997952.0,
}


def small(**kw):
    c = stage_config.load("multitask:tiny")
    for k, v in {**SMALL, **kw}.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def cli(workdir, cache, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    overrides = [f"--config.{k}={v}" for k, v in {**SMALL, **BLOWUP}.items()]
    cmd = [
        sys.executable, "-m", "qwenvl_jax.train", "--config=configs/multitask.py:tiny",
        f"--workdir={workdir}", *overrides, *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def restore_numpy(workdir, step):
    """(params, opt_state leaves) of a kept step, as numpy (not through the trainer's restore)."""
    mngr = ocp.CheckpointManager(
        os.path.join(workdir, ckpt_lib.CKPT_DIR),
        item_names=("params", "opt_state", "meta"),
        options=ocp.CheckpointManagerOptions(create=False),
    )
    try:
        md = mngr.item_metadata(step)
        args = {}
        for item in ("params", "opt_state"):
            tree = getattr(md[item], "tree", md[item])
            as_np = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            args[item] = ocp.args.PyTreeRestore(restore_args=as_np)
        out = mngr.restore(step, args=ocp.args.Composite(**args))
    finally:
        mngr.close()
    return out["params"], [v for _, v in sorted(out["opt_state"].items())]


def assert_all_finite(tree, what):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            assert np.isfinite(x).all(), f"{what}{jax.tree_util.keystr(path)}"


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the optimizer wrapper alone


def toy(lr_after_first=0.1):
    """Params, and Adam whose LR is 0.1 on the first update and `lr_after_first` after it."""
    params = {"w": jnp.array([3e38, -2.0, 0.5]), "b": jnp.array([-0.0, 3.0])}
    lr = lambda count: jnp.where(count == 0, 0.1, lr_after_first)  # noqa: E731
    return params, optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))


def test_skip_nonfinite_on_finite_steps_is_the_inner_optimizer():
    params, inner = toy()
    tx = optim.skip_nonfinite(inner)
    st_in, st = inner.init(params), tx.init(params)
    for i in range(3):
        g = jax.tree.map(lambda p, i=i: jnp.sin(jnp.arange(p.size) + i).reshape(p.shape), params)
        u_in, st_in = inner.update(g, st_in, params)
        u, st = tx.update(g, st, params, finite=jnp.bool_(True))
        want, got = jax.tree.leaves((u_in, st_in)), jax.tree.leaves((u, st.inner_state))
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
        params = optax.apply_updates(params, u)
    assert int(st.nonfinite_steps) == 0


@pytest.mark.parametrize("case", ["flag", "nan_gradient", "overflowing_update"])
def test_skip_nonfinite_applies_nothing_and_counts(case):
    # Overflow: finite gradients, but an update that takes w[0] = 3e38 past float32's range.
    params, inner = toy(3e38 if case == "overflowing_update" else 0.1)
    tx = optim.skip_nonfinite(inner)
    g = jax.tree.map(lambda p: -jnp.ones_like(p), params)  # Adam moves every parameter up
    _, st = tx.update(g, tx.init(params), params, finite=jnp.bool_(True))  # a normal step
    before = jax.device_get(st)
    assert int(before.nonfinite_steps) == 0
    flag = jnp.bool_(case != "flag")
    if case == "nan_gradient":
        g = {"w": jnp.array([1.0, jnp.nan, 1.0]), "b": g["b"]}
        flag = None  # without a flag the gradients themselves are checked
    u, st = tx.update(g, st, params, finite=flag)
    for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(leaf, 0.0)
    assert int(st.nonfinite_steps) == 1
    for a, b in zip(
        jax.tree.leaves(before.inner_state), jax.tree.leaves(st.inner_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_bad_policy_keys_name_the_key(tmp_path):
    c = small(**{"optim.nonfinite": "halt"})
    with pytest.raises(ConfigError) as e:
        train.train(c, str(tmp_path), devices=jax.devices()[:1])
    assert str(e.value) == "--config.optim.nonfinite='halt': must be one of 'skip', 'stop'"
    c = small(**{"optim.max_nonfinite_steps": -1})
    with pytest.raises(ConfigError) as e:
        train.train(c, str(tmp_path), devices=jax.devices()[:1])
    assert str(e.value) == (
        "--config.optim.max_nonfinite_steps=-1: must be an integer >= 0 (skipped steps a run may"
        " have before it stops)"
    )
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


# ---------------------------------------------------------------- the trainer


@pytest.mark.slow  # a compile of its own; the stop test compares the LR 1e12 run's step 1
def test_finite_run_reproduces_the_old_trainer(tmp_path):
    """Policy "skip" (the default) on a finite run: the losses of the trainer before this change."""
    hist = train.train(small(steps=3), str(tmp_path), devices=jax.devices()[:1])
    for key, want in GOLDEN.items():
        np.testing.assert_allclose([r[key] for r in hist], want, rtol=GOLDEN_RTOL, err_msg=key)
    assert [r["nonfinite_steps"] for r in hist] == [0, 0, 0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax_cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory, cache):
    """Policy "skip" with at most 1 skipped step, logging every 2 steps: step 2 is skipped and
    logged, step 3 is skipped too and found at its checkpoint, over the limit."""
    wd = tmp_path_factory.mktemp("skip")
    proc = cli(wd, cache, "--config.log_every=2", "--config.optim.max_nonfinite_steps=1")
    return wd, proc


def test_skip_policy_keeps_the_state_and_stops_over_the_limit(skip_run):
    wd, proc = skip_run
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: step 3: the loss is not finite (nan) at learning rate 1e+12; 2 steps were skipped,"
        " more than config.optim.max_nonfinite_steps=1, so the run stops; the last finite"
        " checkpoint is step 2"
    )
    assert (
        "step 2: the loss is not finite (nan) at learning rate 1e+12; the update was skipped"
        " (1 of at most 1 skipped steps, config.optim.max_nonfinite_steps)"
    ) in proc.stderr
    assert "| 1 non-finite steps skipped |" in proc.stdout  # the progress line of step 2
    assert [(r["step"], r["nonfinite_steps"]) for r in records(wd)] == [(2, 1.0)]
    tb = wd / "tensorboard"  # the scalar's tag is plain text in the event file
    assert any(b"nonfinite_steps" in (tb / f).read_bytes() for f in os.listdir(tb))
    # Step 3 was not saved; keep = 2 holds steps 1 and 2, and step 2 is step 1 exactly.
    assert ckpt_lib.workdir_steps(str(wd)) == [1, 2]
    (p1, o1), (p2, o2) = restore_numpy(str(wd), 1), restore_numpy(str(wd), 2)
    for step, tree in ((1, (p1, o1)), (2, (p2, o2))):
        assert_all_finite(tree, f"step {step} ")
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)
    # The optimizer state too, but for the count (its first leaf: optim.SkipNonFiniteState).
    assert (int(o1[0]), int(o2[0])) == (0, 1)
    for a, b in zip(o1[1:], o2[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_resumed_run_goes_on_counting(skip_run, cache, tmp_path):
    """The count is in the checkpoint: resumed from step 2 (1 skipped) with a limit of 2, steps
    3 and 4 make 2 and 3 (a run that restarted its count would end at 2, exit 0)."""
    wd = tmp_path / "run"
    shutil.copytree(skip_run[0], wd)
    proc = cli(wd, cache, "--config.optim.max_nonfinite_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: step 4: the loss is not finite (nan) at learning rate 1e+12; 3 steps were skipped,"
        " more than config.optim.max_nonfinite_steps=2, so the run stops; the last finite"
        " checkpoint is step 3"
    )
    assert ckpt_lib.workdir_steps(str(wd)) == [2, 3]
    p2, _ = restore_numpy(str(wd), 2)
    p3, o3 = restore_numpy(str(wd), 3)
    assert int(o3[0]) == 2
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p3), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stop_policy_stops_at_the_first_nonfinite_step(cache, tmp_path):
    proc = cli(tmp_path, cache, "--config.optim.nonfinite=stop")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: step 2: the loss is not finite (nan) at learning rate 1e+12; the update was not"
        " applied and the run stops (config.optim.nonfinite='stop'); the last finite checkpoint"
        " is step 1"
    )
    assert "Traceback" not in proc.stderr
    # Step 1 is the old trainer's; step 2 was logged (its loss is NaN) but never saved: only the
    # finite step 1 is kept.
    step1, step2 = records(tmp_path)
    for key, want in GOLDEN_BLOWUP_STEP1.items():
        np.testing.assert_allclose(step1[key], want, rtol=GOLDEN_RTOL, err_msg=key)
    assert (step1["nonfinite_steps"], step2["step"], step2["nonfinite_steps"]) == (0, 2, 1)
    assert np.isnan(step2["loss"])
    assert ckpt_lib.workdir_steps(str(tmp_path)) == [1]
    assert_all_finite(restore_numpy(str(tmp_path), 1), "step 1 ")
