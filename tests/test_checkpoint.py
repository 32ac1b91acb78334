"""Checkpointer: round trip, restore onto another mesh, partial saves ignored, keep-last-K."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import sharding as shd
from qwenvl_jax import tree as tree_lib


def _state(mesh, spec):
    sh = NamedSharding(mesh, spec)
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    params = {"a": {"kernel": jax.device_put(w, sh)}, "b": jax.device_put(np.ones(8, np.float32))}
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    return params, opt


def _abstract(tree, sharding_fn):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), tree
    )


def test_round_trip_onto_a_different_mesh(tmp_path):
    m1 = shd.make_mesh(dict(data=8, fsdp=1, model=1))
    params, opt = _state(m1, P("data", None))
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ck.save(3, params, opt, {"seed": 1}, data_state=json.dumps({"count": 3}), wait=True)
    m2 = shd.make_mesh(dict(data=1, fsdp=4, model=2))
    target = NamedSharding(m2, P("fsdp", "model"))

    def sh(x):
        return target if x.ndim == 2 else NamedSharding(m2, P())

    step, p2, o2, meta = ck.restore_latest(_abstract(params, sh), _abstract(opt, sh))
    ck.close()
    assert step == 3 and meta["seed"] == 1 and json.loads(meta["data_state"][0]) == {"count": 3}
    assert p2["a"]["kernel"].sharding == target
    np.testing.assert_array_equal(np.asarray(p2["a"]["kernel"]), np.asarray(params["a"]["kernel"]))
    for a, b in zip(jax.tree.leaves(o2), jax.tree.leaves(opt), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_partial_save_is_ignored_and_keep_last_k(tmp_path):
    m = shd.make_mesh(dict(data=8, fsdp=1, model=1))
    params, opt = _state(m, P())
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=True)
    for step in (1, 2, 3):
        ck.save(step, params, opt, {}, wait=False)
    ck.wait()
    assert ck.all_steps() == [2, 3]
    ck.close()
    # A save killed before Orbax finalised it leaves only a temporary directory.
    os.makedirs(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-123" / "params")
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    assert ck.all_steps() == [2, 3]
    ab = _abstract(params, lambda x: NamedSharding(m, P()))
    assert ck.restore_latest(ab, _abstract(opt, lambda x: NamedSharding(m, P())))[0] == 3
    ck.close()


def test_optimizer_structure_mismatch_is_reported(tmp_path):
    m = shd.make_mesh(dict(data=8, fsdp=1, model=1))
    params, opt = _state(m, P())
    flat = ckpt_lib.flatten_opt_state(opt)
    other = optax.sgd(0.1).init(params)
    with pytest.raises(ValueError, match="freezing or optimizer config differs"):
        ckpt_lib.unflatten_opt_state(flat, other)


def test_stack_unstack_round_trip():
    per_layer = {
        "transformer": {
            "h": {i: {"w": np.full((2, 3), i, np.float32)} for i in range(3)},
            "visual": {
                "transformer": {"resblocks": {i: {"b": np.full((4,), i)} for i in range(2)}}
            },
        },
        "lm_head": {"kernel": np.zeros((2, 2))},
    }
    st = ckpt_lib.stack_layers(per_layer)
    assert st["transformer"]["h"]["w"].shape == (3, 2, 3)
    np.testing.assert_array_equal(st["transformer"]["h"]["w"][:, 0, 0], [0, 1, 2])
    back = ckpt_lib.unstack_layers(st)
    jax.tree.map(np.testing.assert_array_equal, back, per_layer)


def test_stack_unstack_one_tower_tree():
    # A stage-1 ViT tower has no decoder layers; its blocks stack and unstack on their own.
    vit = {"transformer": {"visual": {"transformer": {"resblocks": {"0": {"b": np.zeros(2)}}}}}}
    assert not ckpt_lib.is_stacked(vit)
    st = ckpt_lib.stack_layers(vit)
    assert ckpt_lib.is_stacked(st)
    assert st["transformer"]["visual"]["transformer"]["resblocks"]["b"].shape == (1, 2)
    assert list(
        ckpt_lib.unstack_layers(st)["transformer"]["visual"]["transformer"]["resblocks"]
    ) == [0]


def _layers(value: float) -> dict:
    return {
        "transformer": {
            "h": {i: {"w": np.full((3,), value + i, np.float32)} for i in range(2)},
            "visual": {"transformer": {"resblocks": {0: {"b": np.full((2,), value, np.float32)}}}},
        }
    }


def test_read_params_steps_layouts_and_a_damaged_step(tmp_path):
    from qwenvl_jax.config import get_preset
    from qwenvl_jax.errors import CheckpointError

    wd = str(tmp_path)
    with pytest.raises(CheckpointError, match="not a training workdir"):
        ckpt_lib.read_params(wd)
    get_preset("tiny").save_hf_json(wd)
    ck = ckpt_lib.Checkpointer(wd, keep=3, async_save=False)
    for step in (1, 2):
        ck.save(step, _layers(10.0 * step), {"count": np.zeros((), np.int32)}, {}, wait=True)
    ck.close()

    cfg, params, step = ckpt_lib.read_params(wd)
    assert cfg == get_preset("tiny") and step == 2
    jax.tree.map(np.testing.assert_array_equal, params, _layers(20.0))  # int layer keys
    _, stacked, step = ckpt_lib.read_params(wd, 1, scan_layers=True)
    assert step == 1
    np.testing.assert_array_equal(stacked["transformer"]["h"]["w"][:, 0], [10.0, 11.0])
    with pytest.raises(CheckpointError, match=r"no step 5; its complete steps are \[1, 2\]"):
        ckpt_lib.read_params(wd, 5)

    for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "params"):
        for name in files:
            open(os.path.join(root, name), "wb").close()
    # No step given: the latest readable one, and nothing is moved (unlike a training resume).
    _, params, step = ckpt_lib.read_params(wd)
    assert step == 1 and ckpt_lib.workdir_steps(wd) == [1, 2]
    jax.tree.map(np.testing.assert_array_equal, params, _layers(10.0))
    with pytest.raises(CheckpointError, match=r"step 2 .* other complete steps: \[1\]"):
        ckpt_lib.read_params(wd, 2)


def test_config_mismatch_is_an_error_and_moves_nothing(tmp_path):
    """A readable step that does not fit the run's trees (e.g. a changed freeze list) is reported,
    not quarantined as corrupt: quarantining would make the next run start from scratch."""
    m = shd.make_mesh(dict(data=8, fsdp=1, model=1))
    params, opt = _state(m, P())
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ck.save(2, params, opt, {}, wait=True)
    repl = lambda x: NamedSharding(m, P())  # noqa: E731
    other = dict(params, c=np.ones(3, np.float32))  # a parameter the checkpoint lacks
    where = f"checkpoint step 2 in {tmp_path / 'checkpoints'}"
    with pytest.raises(tree_lib.TreeMismatchError) as e:
        ck.restore_latest(_abstract(other, repl), _abstract(optax.adamw(1e-3).init(other), repl))
    assert str(e.value) == (
        f"{where}, params: does not fit this run: 1 missing (first c); the model, freezing or"
        " optimizer changed? Nothing was moved; run with the config that wrote it, or use a new"
        " workdir"
    )
    # The same parameters under another optimizer: its state is the tree that does not fit.
    with pytest.raises(tree_lib.TreeMismatchError, match=rf"^{where}, opt_state: does not fit"):
        ck.restore_latest(_abstract(params, repl), _abstract(optax.sgd(0.1).init(params), repl))
    assert ck.all_steps() == [2]
    assert not os.path.exists(tmp_path / ckpt_lib.QUARANTINE_DIR)
    assert ck.restore_latest(_abstract(params, repl), _abstract(opt, repl))[0] == 2
    ck.close()


def test_only_quarantined_steps_refuse_to_start_over(tmp_path):
    m = shd.make_mesh(dict(data=8, fsdp=1, model=1))
    params, opt = _state(m, P())
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ck.save(2, params, opt, {}, wait=True)
    ck.close()
    for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "params"):
        for name in files:
            open(os.path.join(root, name), "wb").close()
    repl = lambda x: NamedSharding(m, P())  # noqa: E731
    ab = (_abstract(params, repl), _abstract(opt, repl))
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    with pytest.raises(RuntimeError, match="Refusing to start from scratch"):
        ck.restore_latest(*ab)
    assert ck.all_steps() == []
    # The next run of the same command must not silently start over either.
    with pytest.raises(RuntimeError, match="quarantined steps"):
        ck.restore_latest(*ab)
    ck.close()
