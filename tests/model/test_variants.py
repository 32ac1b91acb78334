"""Kernel variants on `layers.Einsum` (qwenvl_jax.model.variants): codecs, LoRA, both on one layer.

The goldens are numpy: codes times scales, the einsums of the base and of the adapter written out
here, and the scales recomputed from the float kernel (absmax over the contracted axes / 127).
"""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import lora
from qwenvl_jax.model import layers, variants

D, S, N, H = 16, 3, 2, 8  # a c_attn-shaped kernel [D, 3, N, H], then a Linear [3 N H, D]
RANK, ALPHA = 4, 8.0


class Tiny(nnx.Module):
    """Two variant-capable layers: a fused q/k/v Einsum and a Linear, both with biases."""

    def __init__(self, rngs: nnx.Rngs):
        self.c_attn = layers.Einsum(
            "btd,dsnh->btsnh", (D, S, N, H), ("embed", None, "heads", "head_dim"),
            bias_shape=(S, N, H), bias_names=(None, "heads", "head_dim"), rngs=rngs,
        )  # fmt: skip
        self.c_proj = layers.Linear(S * N * H, D, ("mlp", "embed"), use_bias=True, rngs=rngs)

    def __call__(self, x):
        h = self.c_attn(x)
        return self.c_proj(h.reshape(*h.shape[:2], -1))


def _randomize(model, seed):
    """Random biases and LoRA B (B starts at zero, which would hide the adapter)."""
    rng = np.random.default_rng(seed)
    for _, _, m in variants.find(model):
        m.bias[...] = rng.standard_normal(m.bias.shape).astype(np.float32) * 0.1
        if m.lora_B is not None:
            m.lora_B[...] = rng.standard_normal(m.lora_B.shape).astype(np.float32) * 0.1


def _lc(targets):
    return types.SimpleNamespace(targets=targets, rank=RANK, alpha=ALPHA, dropout=0.05)


def _int8_lora_model(seed=0):
    model = Tiny(nnx.Rngs(seed))
    floats = {variants.path_str(p): np.asarray(m.kernel[...]) for _, p, m in variants.find(model)}
    for _, _, m in list(variants.find(model)):
        variants.set_codec(m, variants.CODECS["int8"])
    lora.add_adapters(model, _lc((r"^c_attn$", r"^c_proj$")), nnx.Rngs(seed + 1))
    _randomize(model, seed)
    return model, floats


def test_int8_scales_are_absmax_over_the_contracted_axes():
    model, floats = _int8_lora_model()
    for name, contracted in (("c_attn", (0,)), ("c_proj", (0,))):
        m, w = getattr(model, name), floats[name]
        assert m.kernel[...].dtype == np.int8
        want = np.max(np.abs(w), axis=contracted, keepdims=True) / 127
        np.testing.assert_allclose(np.asarray(m.kernel_scale[...]), want, rtol=1e-6)
        back = np.asarray(m.kernel[...], np.float32) * np.asarray(m.kernel_scale[...])
        assert np.all(np.abs(back - w) <= want / 2 * (1 + 1e-5)), name
    # The scale's contracted axis is unnamed (size 1); the output axes keep the kernel's names.
    assert model.c_attn.kernel_scale.out_sharding == (None, None, "heads", "head_dim")


def test_int8_base_plus_lora_forward_equals_numpy():
    """int8 codes and LoRA adapters on the same two layers: the forward is dequantized base +
    bias + x A B alpha / r, layer after layer, computed here in numpy (dropout off)."""
    model, _ = _int8_lora_model()
    x = np.random.default_rng(1).standard_normal((2, 5, D)).astype(np.float32)

    def np_layer(m, eqn, x, eqn_a, eqn_b):
        w = np.asarray(m.kernel[...], np.float32) * np.asarray(m.kernel_scale[...])
        base = np.einsum(eqn, x, w) + np.asarray(m.bias[...])
        h = np.einsum(eqn_a, x, np.asarray(m.lora_A[...]))
        return base + np.einsum(eqn_b, h, np.asarray(m.lora_B[...])) * (ALPHA / RANK)

    h = np_layer(model.c_attn, "btd,dsnh->btsnh", x, "btd,dr->btr", "btr,rsnh->btsnh")
    want = np_layer(model.c_proj, "bti,io->bto", h.reshape(2, 5, -1), "bti,ir->btr", "btr,ro->bto")
    got = np.asarray(model(x))
    # float32 on both sides; only the summation order differs.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # The adapters matter (the comparison is not base vs base).
    assert np.abs(want - np.asarray(Tiny(nnx.Rngs(0))(x))).max() > 1e-2


def test_int8_lora_merge_gives_a_plain_model_with_the_same_outputs():
    model, _ = _int8_lora_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    keep = {p for p in lora.tree_lib.flatten(params) if p.endswith((".lora_A", ".lora_B"))}
    trained, base = lora.split(params, keep)
    assert "kernel_scale" in base["c_attn"] and "lora_A" in trained["c_attn"]
    merged = lora.merge(base, trained, ALPHA / RANK)
    # Full precision again, with the paths of a plain layer.
    assert sorted(merged["c_attn"]) == ["bias", "kernel"]
    assert merged["c_attn"]["kernel"].dtype == np.float32
    plain = Tiny(nnx.Rngs(5))
    nnx.replace_by_pure_dict(state := nnx.state(plain, nnx.Param), merged)
    nnx.update(plain, state)
    x = np.random.default_rng(2).standard_normal((2, 5, D)).astype(np.float32)
    want, got = np.asarray(model(x)), np.asarray(plain(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_lora_dropout_draws_masks_only_inside_dropout_rng():
    model, _ = _int8_lora_model()
    x = np.ones((2, 5, D), np.float32)
    a, b = np.asarray(model(x)), np.asarray(model(x))
    np.testing.assert_array_equal(a, b)
    with layers.dropout_rng(jax.random.key(0)):
        c = np.asarray(model(x))
    assert not np.allclose(a, c)


@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4", "int4"])
def test_stacked_layers_keep_one_scale_set_per_layer(mode):
    """A scan-stacked Einsum ([L, D, 3, N, H]) gets its scales per layer: encoding the stack
    equals encoding each layer alone."""
    stacked = layers.make_stacked(lambda r: Tiny(r), 3, nnx.Rngs(0))
    w = np.asarray(stacked.c_attn.kernel[...])
    (_, _, m), *_ = variants.find(stacked, (r"^c_attn$",))
    variants.set_codec(m, variants.CODECS[mode])
    codec = variants.CODECS[mode]
    scale = np.asarray(getattr(m, codec.scale_name)[...])
    want_shape = (3, 1, S, N, H) if codec.block is None else (3, D, S, N, 1)
    assert scale.shape == want_shape
    one = Tiny(nnx.Rngs(0))
    one.c_attn.kernel[...] = w[1]
    variants.set_codec(one.c_attn, codec)
    np.testing.assert_array_equal(np.asarray(m.kernel[...])[1], np.asarray(one.c_attn.kernel[...]))
    np.testing.assert_array_equal(scale[1], np.asarray(getattr(one.c_attn, codec.scale_name)[...]))


def test_walker_finds_layers_by_path_and_names_unmatched_patterns():
    model = Tiny(nnx.Rngs(0))
    assert [variants.path_str(p) for _, p, _ in variants.find(model)] == ["c_attn", "c_proj"]
    assert [variants.path_str(p) for _, p, _ in variants.find(model, (r"proj$",))] == ["c_proj"]
    assert variants.unmatched(model, (r"^c_attn$", r"^nothing$")) == [r"^nothing$"]
    with pytest.raises(lora.ConfigError, match=r"config\.lora\.targets \['\^nothing\$'\]"):
        lora.add_adapters(model, _lc((r"^nothing$",)), nnx.Rngs(0))
