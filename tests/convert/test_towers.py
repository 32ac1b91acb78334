"""Stage-1 tower converters: OpenCLIP ViT -> Qwen-VL ViT trunk, text-only Qwen -> decoder.

The OpenCLIP state dicts are written here by hand in OpenCLIP's layout (standard [Wq; Wk; Wv]
in_proj rows, a class token); the check of the re-interleave is an independent numpy forward of one
pre-norm block with the textbook multi-head attention formula on those weights.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import train_config

from qwenvl_jax.config import get_preset
from qwenvl_jax.convert import (
    StateDictMismatchError,
    load_params,
    mapping,
    openclip,
    qwen_llm,
    save_params,
    tensor_io,
)
from qwenvl_jax.convert import __main__ as cli
from qwenvl_jax.convert.hf import _leaf

TEXT_KEYS = {  # a few OpenCLIP text-tower keys (top level, not under visual.)
    "token_embedding.weight": (50, 8),
    "positional_embedding": (7, 8),
    "transformer.resblocks.0.attn.in_proj_weight": (24, 8),
    "ln_final.weight": (8,),
    "text_projection": (8, 6),
    "logit_scale": (),
}


def openclip_state(width=12, heads=3, patch=2, grid=4, layers=2, mlp=20, embed=6, seed=0):
    """A random OpenCLIP ViT + text-tower state dict (float32 numpy), OpenCLIP key names/shapes."""
    del heads  # not stored in the weights
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.3

    sd = {
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(1 + grid * grid, width),
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.ln_pre.weight": 1 + r(width),
        "visual.ln_pre.bias": r(width),
    }
    for i in range(layers):
        k = f"visual.transformer.resblocks.{i}."
        sd |= {
            k + "ln_1.weight": 1 + r(width),
            k + "ln_1.bias": r(width),
            k + "attn.in_proj_weight": r(3 * width, width),
            k + "attn.in_proj_bias": r(3 * width),
            k + "attn.out_proj.weight": r(width, width),
            k + "attn.out_proj.bias": r(width),
            k + "ln_2.weight": 1 + r(width),
            k + "ln_2.bias": r(width),
            k + "mlp.c_fc.weight": r(mlp, width),
            k + "mlp.c_fc.bias": r(mlp),
            k + "mlp.c_proj.weight": r(width, mlp),
            k + "mlp.c_proj.bias": r(width),
        }
    sd |= {
        "visual.ln_post.weight": 1 + r(width),
        "visual.ln_post.bias": r(width),
        "visual.proj": r(width, embed),
    }
    sd |= {k: r(*s) for k, s in TEXT_KEYS.items()}
    return sd


def write_st(path, sd):
    tensor_io.save_safetensors(str(path), sd)
    return str(path)


# ----------------------------------------------------------------------------- numpy reference
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def reference_block(x, sd, i, heads, eps):
    """One OpenCLIP resblock on tokens x [P, W] (float64): standard nn.MultiheadAttention."""
    g = {k.split(f"resblocks.{i}.")[1]: v.astype(np.float64) for k, v in sd.items()
         if k.startswith(f"visual.transformer.resblocks.{i}.")}  # fmt: skip
    P, W = x.shape
    h = W // heads
    y = _ln(x, g["ln_1.weight"], g["ln_1.bias"], eps)
    wq, wk, wv = np.split(g["attn.in_proj_weight"], 3)  # [Wq; Wk; Wv]
    bq, bk, bv = np.split(g["attn.in_proj_bias"], 3)
    outs = []
    for n in range(heads):
        rows = slice(n * h, (n + 1) * h)
        q = y @ wq[rows].T + bq[rows]
        k = y @ wk[rows].T + bk[rows]
        v = y @ wv[rows].T + bv[rows]
        s = q @ k.T / math.sqrt(h)
        p = np.exp(s - s.max(-1, keepdims=True))
        outs.append((p / p.sum(-1, keepdims=True)) @ v)
    attn = np.concatenate(outs, -1) @ g["attn.out_proj.weight"].T + g["attn.out_proj.bias"]
    x = x + attn
    y = _ln(x, g["ln_2.weight"], g["ln_2.bias"], eps)
    m = _gelu(y @ g["mlp.c_fc.weight"].T + g["mlp.c_fc.bias"])
    return x + m @ g["mlp.c_proj.weight"].T + g["mlp.c_proj.bias"]


def our_block(cfg, block_params, x):
    from qwenvl_jax.model.options import ModelOptions
    from qwenvl_jax.model.visual import VisualAttentionBlock

    blk = VisualAttentionBlock(cfg.visual, ModelOptions(attn_impl="xla"), rngs=nnx.Rngs(0))
    state = nnx.state(blk, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, block_params))
    nnx.update(blk, state)
    return np.asarray(blk(x[None].astype(np.float32))[0])


# ----------------------------------------------------------------------------- ViT
def test_openclip_block_matches_standard_mha(tmp_path):
    heads = 3
    sd = openclip_state(heads=heads)
    f = write_st(tmp_path / "open_clip_model.safetensors", sd)
    cfg, params, report = openclip.import_openclip(f, heads=heads, base=get_preset("tiny"))
    v = cfg.visual
    assert (v.width, v.heads, v.layers, v.mlp_width, v.patch_size, v.pos_grid_size) == (
        12, 3, 2, 20, 2, 4,
    )  # fmt: skip
    assert v.image_size == 8
    assert sorted(report["dropped"]) == sorted(openclip.DROPPED)
    assert report["ignored_non_visual"] == len(TEXT_KEYS)
    vis = params["transformer"]["visual"]
    assert set(vis) == {"conv1", "positional_embedding", "ln_pre", "transformer"}
    np.testing.assert_array_equal(
        vis["positional_embedding"], sd["visual.positional_embedding"][1:]
    )
    np.testing.assert_array_equal(
        vis["conv1"]["kernel"], sd["visual.conv1.weight"].transpose(2, 3, 1, 0)
    )
    x = np.random.default_rng(1).standard_normal((16, 12))  # the 4x4 patch tokens
    for i in range(2):
        want = reference_block(x, sd, i, heads, v.layer_norm_epsilon)
        got = our_block(cfg, vis["transformer"]["resblocks"][i], x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Negative control: skipping the per-head re-interleave gives a different block.
    blk = jax.tree.map(np.copy, vis["transformer"]["resblocks"][0])
    rule = {r.hf_key: r for r in mapping.rules(cfg)}
    key = "transformer.visual.transformer.resblocks.0.attn.in_proj."
    blk["attn"]["in_proj"]["kernel"] = rule[key + "weight"].to_ours(
        sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    )
    blk["attn"]["in_proj"]["bias"] = rule[key + "bias"].to_ours(
        sd["visual.transformer.resblocks.0.attn.in_proj_bias"]
    )
    wrong = our_block(cfg, blk, x)
    assert np.abs(wrong - reference_block(x, sd, 0, heads, v.layer_norm_epsilon)).max() > 1e-2


def test_interleave_qkv_row_order():
    W, n = 6, 3
    a = np.arange(3 * W)  # row index as value
    out = openclip.interleave_qkv(a, n)
    h = W // n
    for head in range(n):
        for s in range(3):
            for d in range(h):
                assert out[head * 3 * h + s * h + d] == s * W + head * h + d


def test_openclip_stacked_layout_and_saved_tower(tmp_path):
    sd = openclip_state()
    f = write_st(tmp_path / "open_clip_model.safetensors", sd)
    _, flat, _ = openclip.import_openclip(f, heads=3, base=get_preset("tiny"))
    cfg, stacked, _ = openclip.import_openclip(
        str(tmp_path), heads=3, base=get_preset("tiny"), scan_layers=True
    )  # a directory holding one open_clip*.safetensors
    blocks = stacked["transformer"]["visual"]["transformer"]["resblocks"]
    for i in range(2):
        jax.tree.map(
            lambda s, p, i=i: np.testing.assert_array_equal(s[i], p),
            blocks,
            flat["transformer"]["visual"]["transformer"]["resblocks"][i],
        )
    save_params(str(tmp_path / "vit"), stacked, cfg)
    _, back = load_params(str(tmp_path / "vit"), scan_layers=False)  # a ViT-only tree unstacks
    jax.tree.map(np.testing.assert_array_equal, back, flat)


def test_openclip_errors(tmp_path):
    sd = openclip_state()
    bad = dict(sd)
    del bad["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    f = write_st(tmp_path / "a.safetensors", bad)
    with pytest.raises(StateDictMismatchError, match=r"resblocks\.1\.mlp\.c_fc\.bias"):
        openclip.import_openclip(f, heads=3, base=get_preset("tiny"))
    bad = dict(sd, **{"visual.attn_pool.query": np.zeros((4, 12), np.float32)})
    f = write_st(tmp_path / "b.safetensors", bad)
    with pytest.raises(StateDictMismatchError, match=r"OpenCLIP key 'visual\.attn_pool\.query'"):
        openclip.import_openclip(f, heads=3, base=get_preset("tiny"))
    bad = dict(sd)
    bad["visual.transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((30, 12), np.float32)
    f = write_st(tmp_path / "c.safetensors", bad)
    with pytest.raises(StateDictMismatchError, match=r"in_proj_weight.*\(30, 12\)"):
        openclip.import_openclip(f, heads=3, base=get_preset("tiny"))
    bad = {k: v for k, v in sd.items() if k != "visual.class_embedding"}
    f = write_st(tmp_path / "d.safetensors", bad)
    with pytest.raises(StateDictMismatchError, match="class_embedding"):
        openclip.import_openclip(f, heads=3, base=get_preset("tiny"))
    with pytest.raises(ValueError, match="does not split into 5 heads"):
        openclip.import_openclip(write_st(tmp_path / "e.safetensors", sd), heads=5)


# ----------------------------------------------------------------------------- LLM
def qwen7b_dir(path, cfg, seed=0, drop=(), extra=None):
    """A text-only HF Qwen directory for `cfg`'s decoder: config.json without `visual`."""
    rng = np.random.default_rng(seed)
    sd = {
        r.hf_key: rng.standard_normal(r.hf_shape).astype(np.float32)
        for r in mapping.rules(cfg)
        if qwen_llm.is_llm_rule(r) and r.hf_key not in drop
    }
    sd |= extra or {}
    os.makedirs(path, exist_ok=True)
    write_st(os.path.join(path, "model.safetensors"), sd)
    d = cfg.to_hf_dict()
    del d["visual"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    return sd


def test_llm_import_round_trip(tmp_path):
    cfg0 = get_preset("tiny", vocab_size=64)
    sd = qwen7b_dir(tmp_path / "qwen7b", cfg0)
    cfg, params = qwen_llm.import_qwen_llm(str(tmp_path / "qwen7b"))
    assert cfg.hidden_size == 256 and cfg.num_hidden_layers == 2 and cfg.vocab_size == 64
    assert set(params) == {"transformer", "lm_head"}
    assert set(params["transformer"]) == {"wte", "h", "ln_f"}
    rules = [r for r in mapping.rules(cfg) if qwen_llm.is_llm_rule(r)]
    for r in rules:  # back to the HF layout: bit-exact
        np.testing.assert_array_equal(r.to_hf(_leaf(params, r, False)), sd[r.hf_key])
    # our format, saved per layer, loaded stacked (the run layout with scan_layers) and back
    save_params(str(tmp_path / "llm"), params, cfg)
    _, stacked = load_params(str(tmp_path / "llm"), scan_layers=True)
    for r in rules:
        np.testing.assert_array_equal(r.to_hf(_leaf(stacked, r, True)), sd[r.hf_key])


def test_llm_import_errors(tmp_path):
    cfg0 = get_preset("tiny", vocab_size=64)
    qwen7b_dir(tmp_path / "a", cfg0, drop=("transformer.ln_f.weight",))
    with pytest.raises(StateDictMismatchError, match=r"missing key 'transformer\.ln_f\.weight'"):
        qwen_llm.import_qwen_llm(str(tmp_path / "a"))
    extra = {"transformer.visual.proj": np.zeros((256, 256), np.float32)}
    qwen7b_dir(tmp_path / "b", cfg0, extra=extra)
    with pytest.raises(StateDictMismatchError, match=r"unexpected key 'transformer\.visual\.proj'"):
        qwen_llm.import_qwen_llm(str(tmp_path / "b"))
    qwen7b_dir(tmp_path / "c", cfg0)
    d = json.load(open(tmp_path / "c" / "config.json"))
    d["visual"] = {}
    json.dump(d, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(ValueError, match="Qwen-VL checkpoint.*convert import"):
        qwen_llm.import_qwen_llm(str(tmp_path / "c"))


# ----------------------------------------------------------------------------- stage 1 init


def test_stage1_init_from_converted_towers(tmp_path):
    from qwenvl_jax import train, tree

    c = train_config("pretrain")
    tiny = get_preset("tiny", vocab_size=1024)
    v = tiny.visual
    # the tiny ViT in OpenCLIP form: 16x16 position grid + class token, patch 14
    sd = openclip_state(
        width=v.width, patch=v.patch_size, grid=16, layers=v.layers, mlp=v.mlp_width
    )
    vit_file = write_st(tmp_path / "open_clip_model.safetensors", sd)
    llm_sd = qwen7b_dir(tmp_path / "qwen7b", tiny)
    assert cli.main(["import-vit", vit_file, str(tmp_path / "vit"), "--heads", str(v.heads)]) == 0
    assert cli.main(["import-llm", str(tmp_path / "qwen7b"), str(tmp_path / "llm")]) == 0
    info = json.load(open(tmp_path / "vit" / "tower.json"))
    assert info["tower"] == "vit" and info["ignored_non_visual"] == len(TEXT_KEYS)
    c.init.allow_random = False
    c.init.vit_checkpoint = str(tmp_path / "vit")
    c.init.llm_checkpoint = str(tmp_path / "llm")
    s = train.build(c, jax.devices()[:1])
    got, desc = train.initial_params(s)
    got = jax.device_get(got)
    rand = jax.device_get(train.init_params(s, int(c.seed)))
    flat_got, flat_rand = tree.flatten(got), tree.flatten(rand)
    scan = bool(c.model.scan_layers)
    for r in mapping.rules(tiny):  # every converted tensor arrived, in the run's layout
        if not (qwen_llm.is_llm_rule(r) or openclip.is_trunk_rule(r)):
            continue
        x = flat_got[".".join(map(str, r.path(scan)))]
        x = x[r.layer] if (scan and r.layer is not None) else x
        if qwen_llm.is_llm_rule(r):
            np.testing.assert_array_equal(r.to_hf(x), llm_sd[r.hf_key], err_msg=r.hf_key)
    pos = flat_got["transformer.visual.positional_embedding"]
    np.testing.assert_array_equal(pos, sd["visual.positional_embedding"][1:])
    for p in flat_got:  # adapter and Qwen-VL's ln_post/proj: the fresh init
        if p.startswith(("transformer.visual.attn_pool.", "transformer.visual.ln_post.")) or (
            p == "transformer.visual.proj"
        ):
            np.testing.assert_array_equal(flat_got[p], flat_rand[p], err_msg=p)
    assert "towers" in desc
