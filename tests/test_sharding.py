"""Mesh resolution, logical-axis rules to PartitionSpecs, ZeRO-1 optimizer-state sharding."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwenvl_jax import sharding as shd
from qwenvl_jax.errors import ConfigError


def mesh(d, f, m):
    return shd.make_mesh(dict(data=d, fsdp=f, model=m), jax.devices()[: d * f * m])


def test_mesh_shape_resolves_one_free_axis():
    assert shd.mesh_shape(dict(data=1, fsdp=-1, model=2), 8) == (1, 4, 2)
    assert shd.mesh_shape(dict(data=-1, fsdp=1, model=1), 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        shd.mesh_shape(dict(data=-1, fsdp=-1, model=1), 8)
    with pytest.raises(ValueError, match="does not divide"):
        shd.mesh_shape(dict(data=1, fsdp=-1, model=3), 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.mesh_shape(dict(data=2, fsdp=4, model=2), 8)


def test_parse_mesh():
    assert shd.parse_mesh("fsdp=4,model=2") == {"data": 1, "fsdp": 4, "model": 2}
    assert shd.parse_mesh(" data = -1 ,") == {"data": -1, "fsdp": 1, "model": 1}
    assert shd.parse_mesh("") == {"data": 1, "fsdp": 1, "model": 1}
    with pytest.raises(ConfigError, match="'tensor' is not a mesh axis"):
        shd.parse_mesh("tensor=2")
    with pytest.raises(ConfigError, match="'model' is not a mesh axis .or is repeated"):
        shd.parse_mesh("model=2,model=2")
    with pytest.raises(ConfigError, match="size of 'model' is not an integer"):
        shd.parse_mesh("model=two")


def test_resolve_mesh():
    assert shd.resolve_mesh(None) is None
    m = mesh(1, 2, 1)
    assert shd.resolve_mesh(m) is m
    n = len(jax.devices())
    got = shd.resolve_mesh(f"data=1,fsdp={n}")
    assert dict(got.shape) == {"data": 1, "fsdp": n, "model": 1}
    assert dict(shd.resolve_mesh({"model": -1}).shape) == {"data": 1, "fsdp": 1, "model": n}
    with pytest.raises(ConfigError, match=f"needs {2 * n} devices.*jax sees {n} devices"):
        shd.resolve_mesh(f"model={2 * n}")


def test_make_mesh_axes():
    m = mesh(2, 2, 2)
    assert m.axis_names == ("data", "fsdp", "model") and dict(m.shape) == dict(
        data=2, fsdp=2, model=2
    )


def test_logical_to_spec_rules_divisibility_and_reuse():
    m = mesh(1, 4, 2)
    rules = shd.DEFAULT_RULES
    # decoder c_attn [L, D, 3, N, H]
    assert shd.logical_to_spec(
        ("layers", "embed", "qkv", "heads", "head_dim"), (2, 256, 3, 4, 64), m, rules
    ) == P(None, "fsdp", None, "model", None)
    # a dimension the mesh axis does not divide stays whole (3 heads over model=2)
    assert shd.logical_to_spec(("embed", "heads"), (256, 3), m, rules) == P("fsdp", None)
    # a mesh axis is used once per array: the second "embed" dimension is not split again
    assert shd.logical_to_spec(("embed", "embed"), (8, 8), m, rules) == P("fsdp", None)
    # a rule with two mesh axes
    assert shd.logical_to_spec(("act_batch",), (8,), mesh(2, 2, 2), rules) == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="no sharding rule"):
        shd.logical_to_spec(("bogus",), (8,), m, rules)
    with pytest.raises(ValueError, match="do not match shape"):
        shd.logical_to_spec(("embed",), (8, 8), m, rules)


def test_rules_from_config_validates_mesh_axes():
    assert shd.rules_from_config([("embed", ["data", "fsdp"])]) == (("embed", ("data", "fsdp")),)
    with pytest.raises(ValueError, match="names mesh axis 'tensor'"):
        shd.rules_from_config([("embed", "tensor")])


def test_zero1_adds_data_axis_where_it_divides():
    m = mesh(2, 2, 2)
    assert shd.add_zero1(P(None, "fsdp"), (5, 8), m) == P(None, ("data", "fsdp"))
    assert shd.add_zero1(P(None, "fsdp"), (6, 8), m) == P("data", "fsdp")
    assert shd.add_zero1(P("model", None), (4, 8), m) == P(("data", "model"), None)
    assert shd.add_zero1(P(), (3, 5), m) == P()  # nothing divisible: stays replicated over data
    assert shd.add_zero1(P("data"), (4,), m) == P("data")


def test_device_bytes_and_replication_check():
    m = mesh(1, 4, 2)
    abstract = {"w": jax.ShapeDtypeStruct((1024, 512), np.float32)}
    split = {"w": jax.sharding.NamedSharding(m, P("fsdp", "model"))}
    assert shd.device_bytes(abstract, split) == 1024 * 512 * 4 // 8
    shd.check_no_large_replicated(abstract, split, m, max_bytes=1)
    repl = {"w": jax.sharding.NamedSharding(m, P())}
    with pytest.raises(ValueError, match="w \\(1024, 512\\)"):
        shd.check_no_large_replicated(abstract, repl, m, max_bytes=2**20)
    shd.check_no_large_replicated(abstract, repl, m, max_bytes=2**20, allow=["^w$"])
    # a pure data-parallel mesh replicates on purpose
    shd.check_no_large_replicated(abstract, {"w": repl["w"]}, mesh(8, 1, 1), max_bytes=1)


def test_step_batch_is_split_over_data_and_fsdp():
    # The trainer's host rows -> [A, B/A, ...] global arrays, rows over (data, fsdp).
    from qwenvl_jax import train
    from qwenvl_jax.data.random_batches import RandomBatches
    from qwenvl_jax.train import stage_config

    c = stage_config.load("multitask:tiny")
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 2, 2, 2
    c.batch_size, c.grad_accum = 8, 2
    s = train.build(c)
    local = next(RandomBatches(c, s.mcfg, 8, 0))
    g = train.to_step_batch(local, s)["input_ids"]
    assert g.shape == (2, 4, c.data.seq_len)
    assert g.sharding.spec == P(None, ("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(g).reshape(8, -1), local["input_ids"])
    assert {sh.data.shape for sh in g.addressable_shards} == {(2, 1, c.data.seq_len)}
