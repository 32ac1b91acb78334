"""Model tests on the tiny preset; goldens are hand formulas or spec numbers, never the model."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from qwenvl_jax.config import get_preset
from qwenvl_jax.model import layers
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwen import dynamic_ntk_alpha, init_cache, logn_table, rotary_inv_freq
from qwenvl_jax.model.qwenvl import QWenLMHeadModel
from qwenvl_jax.model.resampler import sincos_2d
from qwenvl_jax.model.visual import bicubic_matrix, pos_resize_matrix
from qwenvl_jax.tokenizer import image_token_index

TINY = get_preset("tiny")


def _aten_cubic_weight(x: float, a: float = -0.75) -> float:
    """Keys cubic convolution kernel W(x) written from the textbook piecewise form."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _direct_bicubic(in_size: int, out_size: int) -> np.ndarray:
    """Independent float64 evaluation: weight of source pixel j for output i, clamped taps."""
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = (i + 0.5) * in_size / out_size - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), in_size - 1)] += _aten_cubic_weight(src - tap)
    return m


def test_bicubic_first_rows_match_spec():
    m = bicubic_matrix(16, 32)
    assert m.shape == (32, 16) and m.dtype == np.float32
    spec_rows = [
        [1.105469, -0.105469, 0.0],
        [0.773438, 0.261719, -0.035156],
        [0.226562, 0.878906, -0.105469],
        [-0.105469, 0.878906, 0.261719, -0.035156],
    ]
    for r, row in enumerate(spec_rows):
        np.testing.assert_allclose(m[r, : len(row)], row, atol=1e-6)
        assert np.all(m[r, len(row) :] == 0)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("in_size,out_size", [(16, 32), (16, 8), (16, 4), (16, 16), (7, 13)])
def test_bicubic_matches_direct_formula(in_size, out_size):
    np.testing.assert_allclose(
        bicubic_matrix(in_size, out_size), _direct_bicubic(in_size, out_size), atol=2e-6
    )


def test_pos_resize_matrix_is_row_major_separable():
    k = pos_resize_matrix(256, 16)  # 16x16 -> 4x4
    m = _direct_bicubic(16, 4)
    table = np.random.default_rng(0).normal(size=(256, 3))
    grid = table.reshape(16, 16, 3)
    expect = np.einsum("ri,cj,ijd->rcd", m, m, grid).reshape(16, 3)
    np.testing.assert_allclose(k @ table, expect, atol=1e-5)


def test_sincos_table_entries():
    dim, g = 16, 4
    t = sincos_2d(dim, g)
    assert t.shape == (16, 16) and t.dtype == np.float32
    quarter = dim // 4
    for i, j in [(0, 0), (1, 2), (3, 1), (2, 3)]:
        row = t[i * g + j]
        for k in range(quarter):
            omega = 1.0 / 10000 ** (k / quarter)
            # First half: column j; second half: row i; each [sin..., cos...].
            assert row[k] == pytest.approx(math.sin(j * omega), abs=1e-6)
            assert row[quarter + k] == pytest.approx(math.cos(j * omega), abs=1e-6)
            assert row[2 * quarter + k] == pytest.approx(math.sin(i * omega), abs=1e-6)
            assert row[3 * quarter + k] == pytest.approx(math.cos(i * omega), abs=1e-6)


def test_ntk_alpha_and_logn_values():
    assert [dynamic_ntk_alpha(n, 2048) for n in (1, 2048, 2049, 4096, 4097, 8192, 8193)] == [
        1.0, 1.0, 3.0, 3.0, 7.0, 7.0, 15.0,
    ]  # fmt: skip
    table = logn_table(2048)
    assert table[2047] == 1.0  # position 2047 is the 2048th token
    assert table[2048] == pytest.approx(math.log(2049) / math.log(2048), rel=1e-7)
    inv = np.asarray(rotary_inv_freq(128, 10000.0, 3.0))
    base = 10000.0 * 3.0 ** (128 / 126)
    np.testing.assert_allclose(inv, 1.0 / base ** (np.arange(0, 128, 2) / 128), rtol=1e-6)


# ----------------------------------------------------------------------------- model structure
@pytest.fixture(scope="module")
def tiny_model():
    return nnx.eval_shape(lambda: QWenLMHeadModel(TINY, ModelOptions(), rngs=nnx.Rngs(0)))


def _flat_params(model):
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _hf_key_shapes(cfg):
    """The HF state-dict keys and torch shapes (spec 4.2) written out for a config."""
    d, v, n, h, f = (
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.num_attention_heads,
        cfg.head_dim,
        cfg.mlp_width,
    )
    vc = cfg.visual
    w, p, fv = vc.width, vc.patch_size, vc.mlp_width
    out = {
        "transformer.wte.weight": (v, d),
        "transformer.ln_f.weight": (d,),
        "lm_head.weight": (v, d),
    }
    for i in range(cfg.num_hidden_layers):
        pre = f"transformer.h.{i}."
        out |= {
            pre + "ln_1.weight": (d,),
            pre + "attn.c_attn.weight": (3 * n * h, d),
            pre + "attn.c_attn.bias": (3 * n * h,),
            pre + "attn.c_proj.weight": (d, n * h),
            pre + "ln_2.weight": (d,),
            pre + "mlp.w1.weight": (f, d),
            pre + "mlp.w2.weight": (f, d),
            pre + "mlp.c_proj.weight": (d, f),
        }
    vis = "transformer.visual."
    out |= {
        vis + "conv1.weight": (w, 3, p, p),
        vis + "positional_embedding": (vc.pos_grid_size**2, w),
        vis + "ln_pre.weight": (w,),
        vis + "ln_pre.bias": (w,),
        vis + "attn_pool.pos_embed": (vc.n_queries, d),
        vis + "attn_pool.query": (vc.n_queries, d),
        vis + "attn_pool.kv_proj.weight": (d, w),
        vis + "attn_pool.attn.in_proj_weight": (3 * d, d),
        vis + "attn_pool.attn.in_proj_bias": (3 * d,),
        vis + "attn_pool.attn.out_proj.weight": (d, d),
        vis + "attn_pool.attn.out_proj.bias": (d,),
        vis + "ln_post.weight": (d,),
        vis + "ln_post.bias": (d,),
        vis + "proj": (d, d),
    }
    for ln in ("ln_q", "ln_kv"):
        out |= {vis + f"attn_pool.{ln}.weight": (d,), vis + f"attn_pool.{ln}.bias": (d,)}
    for i in range(vc.layers):
        pre = f"{vis}transformer.resblocks.{i}."
        out |= {
            pre + "ln_1.weight": (w,),
            pre + "ln_1.bias": (w,),
            pre + "ln_2.weight": (w,),
            pre + "ln_2.bias": (w,),
            pre + "attn.in_proj.weight": (3 * w, w),
            pre + "attn.in_proj.bias": (3 * w,),
            pre + "attn.out_proj.weight": (w, w),
            pre + "attn.out_proj.bias": (w,),
            pre + "mlp.c_fc.weight": (fv, w),
            pre + "mlp.c_fc.bias": (fv,),
            pre + "mlp.c_proj.weight": (w, fv),
            pre + "mlp.c_proj.bias": (w,),
        }
    return out


def _hf_to_nnx(key: str) -> str:
    """docs/architecture.md's renaming table: weight -> kernel/scale/embedding, in_proj_* split."""
    key = key.replace("attn_pool.attn.in_proj_weight", "attn_pool.attn.in_proj.kernel")
    key = key.replace("attn_pool.attn.in_proj_bias", "attn_pool.attn.in_proj.bias")
    if key.endswith("wte.weight"):
        return key[: -len("weight")] + "embedding"
    if key.endswith(".weight") and (".ln_" in key or key.endswith("ln_f.weight")):
        return key[: -len("weight")] + "scale"
    if key.endswith(".weight"):
        return key[: -len("weight")] + "kernel"
    return key


def _nnx_shape(key: str, shape: tuple, cfg) -> tuple:
    """The NNX shape of an HF tensor after the transposes/reshapes of docs/architecture.md."""
    vc = cfg.visual
    n, h, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    nv, hv, w = vc.heads, vc.width // vc.heads, vc.width
    nr = vc.resampler_heads
    hr = d // nr
    rules = [
        (r"\.h\.\d+\.attn\.c_attn\.weight$", (d, 3, n, h)),
        (r"\.h\.\d+\.attn\.c_attn\.bias$", (3, n, h)),
        (r"\.h\.\d+\.attn\.c_proj\.weight$", (n, h, d)),
        (r"resblocks\.\d+\.attn\.in_proj\.weight$", (w, nv, 3, hv)),
        (r"resblocks\.\d+\.attn\.in_proj\.bias$", (nv, 3, hv)),
        (r"resblocks\.\d+\.attn\.out_proj\.weight$", (nv, hv, w)),
        (r"attn_pool\.attn\.in_proj_weight$", (d, 3, nr, hr)),
        (r"attn_pool\.attn\.in_proj_bias$", (3, nr, hr)),
        (r"attn_pool\.attn\.out_proj\.weight$", (nr, hr, d)),
    ]
    for pattern, out in rules:
        if re.search(pattern, key):
            return out
    if key.endswith("conv1.weight"):
        o, i, kh, kw = shape
        return (kh, kw, i, o)
    if key.endswith((".proj", "wte.weight", "query", "pos_embed", "positional_embedding")):
        return shape  # used as stored (proj: x @ proj)
    if key.endswith(".weight") and len(shape) == 2:
        return shape[::-1]  # nn.Linear [out, in] -> kernel [in, out]
    return shape


def test_param_paths_and_shapes_match_hf_table(tiny_model):
    params = _flat_params(tiny_model)
    hf = _hf_key_shapes(TINY)
    expected = {_hf_to_nnx(k): _nnx_shape(k, s, TINY) for k, s in hf.items()}
    assert set(params) == set(expected)
    for path, shape in expected.items():
        assert params[path].get_value().shape == shape, path
    for key, shape in hf.items():  # the reshapes only regroup elements
        assert math.prod(expected[_hf_to_nnx(key)]) == math.prod(shape), key


def test_every_param_has_logical_names(tiny_model):
    for path, p in _flat_params(tiny_model).items():
        names = p.get_metadata()["out_sharding"]
        assert len(names) == p.get_value().ndim, path
        assert all(nm is None or nm in layers.PARAM_AXES for nm in names), (path, names)
    rules = (("embed", "fsdp"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"))
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(AxisType.Auto,) * 2)
    with layers.logical_rules(mesh, rules):
        specs = nnx.get_partition_spec(nnx.state(tiny_model, nnx.Param))
    assert specs["lm_head"]["kernel"].get_value() == jax.sharding.PartitionSpec("fsdp", "model")
    c_attn = specs["transformer"]["h"][0]["attn"]["c_attn"]["kernel"].get_value()
    assert c_attn == jax.sharding.PartitionSpec("fsdp", None, "model", None)


def test_7b_parameter_count():
    # The stacked layout traces one block per tower; test_param_paths covers the unstacked one.
    abstract = nnx.eval_shape(
        lambda: QWenLMHeadModel(
            get_preset("qwen-vl-7b"), ModelOptions(scan_layers=True), rngs=nnx.Rngs(0)
        )
    )
    params = _flat_params(abstract)
    total = sum(math.prod(p.get_value().shape) for p in params.values())
    visual = sum(
        math.prod(p.get_value().shape)
        for k, p in params.items()
        if k.startswith("transformer.visual.")
    )
    assert total == 9_656_935_168
    assert visual == 1_935_610_624
    assert total - visual == 7_721_324_544


# ----------------------------------------------------------------------------- forward semantics
# A small vocabulary and image ids inside it keep these models fast to build on CPU.
SMALL = get_preset("tiny", vocab_size=1000, visual={"image_start_id": 990})
SIMG = SMALL.visual.image_start_id
# float32 on CPU: two computations of the same math differ only by reassociation.
ATOL = 2e-5


def _copy_params(src, dst):
    """Copy Params between models of the same config, stacking/unstacking `layers` as needed and
    casting to dst's parameter dtype (dst may be abstract, from `nnx.eval_shape`)."""
    src_flat = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(src, nnx.Param))}
    for key, var in nnx.to_flat_state(nnx.state(dst, nnx.Param)):
        want = var.get_value()
        if key in src_flat:
            value = src_flat[key]
        else:
            for stack in ("h", "resblocks"):
                if stack in key:
                    i = key.index(stack) + 1
                    if i < len(key) and isinstance(key[i], int):  # dst unstacked, src stacked
                        value = src_flat[key[:i] + key[i + 1 :]][key[i]]
                    else:  # dst stacked
                        n = want.shape[0]
                        value = jnp.stack([src_flat[key[:i] + (j,) + key[i:]] for j in range(n)])
                    break
            else:
                raise KeyError(key)
        assert value.shape == want.shape, key
        var.set_value(jnp.asarray(value, want.dtype))


def _model_like(src, **kwargs):
    """A model with other construction options holding src's parameters (no random init)."""
    dst = nnx.eval_shape(lambda: QWenLMHeadModel(SMALL, ModelOptions(**kwargs), rngs=nnx.Rngs(0)))
    _copy_params(src, dst)
    return dst


@nnx.jit
def _jit_forward(model, ids, kwargs):
    return model(ids, **kwargs)


def _fwd(model, ids, **kwargs):
    """The model's forward under one jit (far fewer compilations than eager op-by-op on CPU)."""
    return np.asarray(_jit_forward(model, ids, kwargs))


@pytest.fixture(scope="module")
def small_model():
    return QWenLMHeadModel(SMALL, ModelOptions(), rngs=nnx.Rngs(1))


def _ids(seed, n):
    return np.random.default_rng(seed).integers(0, 900, n).astype(np.int32)


def _images(seed, m):
    s = SMALL.visual.image_size
    return np.random.default_rng(seed).normal(size=(1, m, s, s, 3)).astype(np.float32)


def _image_prompt(seed):
    span = [SIMG] + [SIMG + 2] * 256 + [SIMG + 1]
    ids = np.array([list(_ids(seed, 3)) + span + list(_ids(seed + 1, 4)) + span + [7, 8]])
    idx, counts = image_token_index(ids, SIMG, 256)
    assert counts.tolist() == [2]
    return jnp.asarray(ids, jnp.int32), jnp.asarray(idx)


def test_scan_and_unscanned_layouts_give_identical_logits(small_model):
    scanned = _model_like(small_model, scan_layers=True)
    flat = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
    assert flat[("transformer", "h", "attn", "c_attn", "kernel")].get_value().shape[0] == 2
    meta = flat[("transformer", "h", "attn", "c_attn", "kernel")].get_metadata()
    assert meta["out_sharding"] == ("layers", "embed", "qkv", "heads", "head_dim")
    ids, idx = _image_prompt(0)
    imgs = jnp.asarray(_images(0, 2))
    a = _fwd(small_model, ids, images=imgs, image_token_index=idx)
    b = _fwd(scanned, ids, images=imgs, image_token_index=idx)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_remat_and_attention_implementation_do_not_change_logits(small_model):
    ids = jnp.asarray(_ids(3, 12))[None]
    ref = _fwd(small_model, ids)
    for kw in ({"remat": "full"}, {"remat": "dots_saveable", "scan_layers": True}):
        other = _model_like(small_model, **kw)
        np.testing.assert_allclose(_fwd(other, ids), ref, atol=ATOL, rtol=0)
    other = _model_like(small_model, attn_impl="jax")
    np.testing.assert_allclose(_fwd(other, ids), ref, atol=ATOL, rtol=0)


def test_packed_segments_equal_separate_samples(small_model):
    a, b = _ids(10, 7), _ids(11, 5)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]]))[None]
    seg = jnp.asarray([[1] * 7 + [2] * 5 + [0, 0]], jnp.int32)
    pos = jnp.asarray([list(range(7)) + list(range(5)) + [0, 1]], jnp.int32)
    out = _fwd(small_model, packed, segment_ids=seg, positions=pos)
    alone_a = _fwd(small_model, jnp.asarray(a)[None])
    alone_b = _fwd(small_model, jnp.asarray(b)[None])
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[0, 7:12], alone_b[0], atol=ATOL, rtol=0)
    assert np.isfinite(out).all()  # padding rows stay finite


def test_images_enter_only_their_spans(small_model):
    ids, idx = _image_prompt(20)
    imgs = _images(21, 2)
    base = _fwd(small_model, ids, images=jnp.asarray(imgs), image_token_index=idx)
    changed = imgs.copy()
    changed[0, 1] = _images(22, 1)[0, 0]  # only the second image differs
    out = _fwd(small_model, ids, images=jnp.asarray(changed), image_token_index=idx)
    second = int(np.flatnonzero(np.asarray(ids[0]) == SIMG)[1])
    np.testing.assert_array_equal(out[0, : second + 1], base[0, : second + 1])
    assert np.abs(out[0, second + 1 :] - base[0, second + 1 :]).max() > 1e-3
    # Text-token embeddings inside a span do not matter: features replace them.
    other_ids = jnp.where(idx >= 0, 5, ids)
    out2 = _fwd(small_model, other_ids, images=jnp.asarray(imgs), image_token_index=idx)
    np.testing.assert_allclose(out2, base, atol=ATOL, rtol=0)


def test_cached_forward_equals_full_forward_with_ntk_and_logn():
    # seq_length=16 makes dynamic NTK and logn active for short prompts.
    cfg = SMALL.replace(seq_length=16)
    model = QWenLMHeadModel(cfg, ModelOptions(scan_layers=True), rngs=nnx.Rngs(3))
    ids = jnp.asarray(_ids(30, 40))[None]
    alpha = dynamic_ntk_alpha(30, 16)
    assert alpha == 3.0
    fwd = nnx.jit(
        lambda m, x, c, i, logn: m(x, cache=c, cache_index=i, ntk_alpha=alpha, use_logn=logn),
        static_argnums=4,
    )
    full = np.asarray(fwd(model, ids, None, None, True))
    cache = init_cache(cfg, 1, 48)
    logits, cache = fwd(model, ids[:, :30], cache, 0, True)
    np.testing.assert_allclose(np.asarray(logits[0]), full[0, :30], atol=ATOL, rtol=0)
    for t in range(30, 40):
        step, cache = fwd(model, ids[:, t : t + 1], cache, t, True)
        np.testing.assert_allclose(np.asarray(step[0, 0]), full[0, t], atol=ATOL, rtol=0)
    # Without logn the late positions differ, so the comparison above exercised it.
    plain = np.asarray(fwd(model, ids, None, None, False))
    assert np.abs(plain[0, 20:] - full[0, 20:]).max() > 1e-4
    np.testing.assert_allclose(plain[0, :16], full[0, :16], atol=ATOL, rtol=0)


def test_shard_activation_under_mesh(small_model):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rules = (("act_batch", "data"), ("act_vocab", "model"), ("act_mlp", "model"))
    ids = jnp.asarray(np.stack([_ids(40, 8), _ids(41, 8)]))
    ref = _fwd(small_model, ids)
    with layers.logical_rules(mesh, rules):
        out = nnx.jit(lambda m, x: m(x))(small_model, ids)
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", None, "model")
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0)


def _naive_attention(q, k, v, allowed, scale):
    """float64 numpy attention with an explicit [B, T, S] allowed-mask."""
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def test_dot_product_attention_masks():
    from qwenvl_jax.model.attention import dot_product_attention

    rng = np.random.default_rng(0)
    b, t, s, n, h = 2, 3, 6, 2, 4
    q, k, v = (rng.normal(size=(b, x, n, h)) for x in (t, s, s))
    seg_q = np.array([[1, 1, 2], [1, 1, 1]])
    seg_k = np.array([[1, 1, 1, 2, 2, 0], [0, 1, 1, 1, 1, 1]])
    q_pos = np.array([[2, 3, 4], [3, 4, 5]])
    allowed = (np.arange(s)[None, None] <= q_pos[:, :, None]) & (
        seg_q[:, :, None] == seg_k[:, None, :]
    )
    got = dot_product_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
        causal=True,
        scale=0.5,
        q_segment_ids=jnp.asarray(seg_q),
        kv_segment_ids=jnp.asarray(seg_k),
        q_positions=jnp.asarray(q_pos),
        kv_positions=jnp.broadcast_to(jnp.arange(s), (b, s)),
    )
    np.testing.assert_allclose(np.asarray(got), _naive_attention(q, k, v, allowed, 0.5), atol=1e-5)
    # Defaults: causal over the last T of S keys, no segments.
    got = dot_product_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), causal=True, scale=0.5
    )
    allowed = np.broadcast_to(np.arange(s)[None] <= np.arange(t)[:, None] + s - t, (b, t, s))
    np.testing.assert_allclose(np.asarray(got), _naive_attention(q, k, v, allowed, 0.5), atol=1e-5)


def test_gradients_flow_through_scan_remat_and_images():
    model = QWenLMHeadModel(SMALL, ModelOptions(scan_layers=True, remat="full"), rngs=nnx.Rngs(4))
    ids, idx = _image_prompt(50)
    imgs = jnp.asarray(_images(51, 2))

    def loss_fn(m):
        logits = m(ids, images=imgs, image_token_index=idx)
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    assert np.isfinite(float(loss))
    g = grads["transformer"]["visual"]["transformer"]["resblocks"]["attn"]["in_proj"]["kernel"]
    assert g.get_value().shape[0] == SMALL.visual.layers
    assert float(jnp.abs(g.get_value()).max()) > 0  # the ViT is in the graph
    g = grads["transformer"]["h"]["mlp"]["w2"]["kernel"].get_value()
    assert float(jnp.abs(g).max()) > 0


def test_bfloat16_compute_is_close_to_float32(small_model):
    bf = _model_like(small_model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = bf.transformer.h[0].attn.c_attn.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16  # parameters and compute in bf16, as dtype="bfloat16"
    ids, idx = _image_prompt(60)
    imgs = jnp.asarray(_images(61, 2))
    out = _fwd(bf, ids, images=imgs, image_token_index=idx)
    assert out.dtype == jnp.bfloat16
    ref = _fwd(small_model, ids, images=imgs, image_token_index=idx)
    # bf16 keeps 8 mantissa bits; through 2+2 blocks the logits drift by a few percent of range.
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 0.05


def test_random_init_follows_the_published_initializer():
    """A fresh model is initialised as the published code does it (HF `_init_weights` with
    `initializer_range`, c_proj at std / sqrt(2 L), torch defaults where HF's init does not
    reach): the expected spreads are typed from those formulas, and checked statistically."""
    import dataclasses

    std, L = 0.1, TINY.num_hidden_layers
    cfg = dataclasses.replace(TINY, initializer_range=std)
    p = _flat_params(QWenLMHeadModel(cfg, ModelOptions(), rngs=nnx.Rngs(0)))
    p = {k: np.asarray(v.get_value()) for k, v in p.items()}
    d, w = cfg.hidden_size, cfg.visual.width

    def check_std(key, want):
        got = p[key].std()
        assert abs(got / want - 1) < 0.1, f"{key}: std {got:.4g}, published init {want:.4g}"

    for key in [
        "transformer.wte.embedding",
        "transformer.h.0.attn.c_attn.kernel",
        "transformer.h.1.mlp.w1.kernel",
        "transformer.h.1.mlp.w2.kernel",
        "lm_head.kernel",
        "transformer.visual.transformer.resblocks.0.attn.in_proj.kernel",
        "transformer.visual.transformer.resblocks.1.attn.out_proj.kernel",
        "transformer.visual.transformer.resblocks.0.mlp.c_fc.kernel",
        "transformer.visual.attn_pool.attn.out_proj.kernel",
    ]:
        check_std(key, std)
    for key in [
        "transformer.h.0.attn.c_proj.kernel",
        "transformer.h.1.mlp.c_proj.kernel",
        "transformer.visual.transformer.resblocks.1.mlp.c_proj.kernel",
    ]:
        check_std(key, std / math.sqrt(2 * L))
    # torch defaults: Conv2d U(+-1/sqrt(fan_in)); MultiheadAttention in_proj xavier_uniform on
    # the [3D, D] matrix, U(+-sqrt(6 / (4 D))).
    patch = cfg.visual.patch_size
    check_std("transformer.visual.conv1.kernel", 1 / math.sqrt(3 * 3 * patch * patch))
    check_std(
        "transformer.visual.attn_pool.attn.in_proj.kernel", math.sqrt(6 / (4 * d)) / math.sqrt(3)
    )
    assert np.abs(p["transformer.visual.conv1.kernel"]).max() <= 1 / math.sqrt(3 * patch * patch)
    # Own spreads, independent of initializer_range: query trunc_normal(0.02), width^-0.5 tables.
    check_std("transformer.visual.attn_pool.query", 0.02)
    check_std("transformer.visual.positional_embedding", w**-0.5)
    check_std("transformer.visual.proj", cfg.visual.output_dim**-0.5)
    for key, v in p.items():
        if key.endswith(".bias"):
            assert (v == 0).all(), key


# ----------------------------------------------------------------------------- image budget
def _rows_with_images(counts, q, t, start_id, seed):
    """Rows of random text with counts[r] image spans each (`<img>` + q + `</img>`), length t."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in counts:
        row = list(rng.integers(0, 900, 3))
        for _ in range(c):
            row += [start_id] + [start_id + 2] * q + [start_id + 1] + list(rng.integers(0, 900, 2))
        rows.append(row + list(rng.integers(0, 900, t - len(row))))
    return np.asarray(rows, np.int32)


def test_image_budget_equals_encoding_every_slot():
    """Encoding only the valid slots (gathered up to a static budget per row block, features
    gathered back to their slots) gives the all-slots logits and gradients (float32); the empty
    slots hold garbage pixels that must not matter. Over the budget, images would be lost (the
    trainer refuses such batches: tests/train/test_train.py)."""
    cfg = get_preset("tiny", vocab_size=1000, visual={"image_start_id": 990, "n_queries": 16})
    model = QWenLMHeadModel(cfg, ModelOptions(), rngs=nnx.Rngs(7))
    counts, m = [2, 0, 1, 3], 3  # row blocks of 2 rows: 2 and 4 images
    ids = _rows_with_images(counts, 16, 80, 990, seed=0)
    idx, got = image_token_index(ids, 990, 16)
    assert got.tolist() == counts
    s = cfg.visual.image_size
    imgs = np.random.default_rng(1).normal(size=(4, m, s, s, 3)).astype(np.float32)
    valid = np.arange(m)[None] < np.asarray(counts)[:, None]
    args = (jnp.asarray(ids), jnp.asarray(imgs), jnp.asarray(idx), jnp.asarray(valid))

    @nnx.jit(static_argnums=(5, 6))
    def loss_and_grad(model, ids, imgs, idx, valid, budget, groups):
        def f(mdl):
            kw = dict(image_valid=valid, image_budget=budget, image_groups=groups) if budget else {}
            logits = mdl(ids, images=imgs, image_token_index=idx, **kw)
            return jnp.sum(jnp.sin(logits)), logits

        return nnx.value_and_grad(f, has_aux=True)(model)

    (_, full), g_full = loss_and_grad(model, *args, 0, 1)
    conv = ("transformer", "visual", "conv1", "kernel")
    g_full = dict(nnx.to_flat_state(g_full))
    for budget, groups in ((4, 2), (6, 1), (2 * 4, 2)):
        (_, out), g = loss_and_grad(model, *args, budget, groups)
        np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=ATOL, rtol=0)
        g = dict(nnx.to_flat_state(g))
        for key in (conv, ("transformer", "visual", "attn_pool", "query")):
            want = np.asarray(g_full[key].get_value())
            np.testing.assert_allclose(
                np.asarray(g[key].get_value()), want, atol=1e-4 * np.abs(want).max(), rtol=0
            )
    # Garbage in the empty slots does not reach the loss of the all-slots path either: the check
    # above is not vacuous because the budgeted path never encodes them.
    (_, over), _ = loss_and_grad(model, *args, 3, 2)  # the second block holds 4 > 3 images
    assert np.abs(np.asarray(over) - np.asarray(full)).max() > 1e-3


# ----------------------------------------------------------------------------- remat policies
@pytest.mark.parametrize(
    "policy,kept,dropped",
    [
        ("save_attn", {"qkv_proj", "attn_out"}, {"mlp_hidden"}),
        ("save_attn_mlp", {"qkv_proj", "attn_out", "mlp_hidden"}, set()),
        ("full", set(), {"qkv_proj", "attn_out", "mlp_hidden"}),
    ],
)
def test_named_remat_policies_keep_their_tensors(small_model, policy, kept, dropped, capsys):
    """The named policies keep exactly their tagged activations for the backward pass (what
    `jax.ad_checkpoint.print_saved_residuals` lists), and the gradients do not change."""
    from jax.ad_checkpoint import print_saved_residuals

    ids = jnp.asarray(_ids(30, 12))[None]
    other = _model_like(small_model, remat=policy)
    graphdef, state = nnx.split(other)

    def loss(state):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(ids)))

    capsys.readouterr()
    print_saved_residuals(loss, state)
    saved = set(re.findall(r"named '(\w+)'", capsys.readouterr().out))
    assert kept <= saved and not (dropped & saved), saved
    ref_graphdef, ref_state = nnx.split(small_model)
    g = jax.grad(loss)(state)
    want = jax.grad(lambda st: jnp.sum(jnp.sin(nnx.merge(ref_graphdef, st)(ids))))(ref_state)
    for (k, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(want), strict=True):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                   atol=ATOL, rtol=1e-5, err_msg=str(k))  # fmt: skip
