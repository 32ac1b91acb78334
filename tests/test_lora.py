"""LoRA / Q-LoRA fine-tuning on the tiny model (configs/sft.py:lora / :qlora, qwenvl_jax.lora).

What is checked: the adapters sit where the published recipe puts them; training moves only the
adapters (the base is bit-identical, only adapters have optimizer state and only they are in the
checkpoint); resuming gives the uninterrupted run's params; the merged export equals base +
adapter; Q-LoRA trains. That PEFT loads the adapter in the published code is checked by
tools/check_peft_adapter.py when it runs (its record, tests/fixtures/reference/peft_check_tiny.json,
is written only when the check passes).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import set_keys

from qwenvl_jax import checkpoint, lora
from qwenvl_jax.convert import ours
from qwenvl_jax.model import variants
from qwenvl_jax.train import stage_config
from qwenvl_jax.train.sources import base_params, initial_params
from qwenvl_jax.train.state import build, init_params, merge_model, model_config
from qwenvl_jax.train.step import make_train_step, to_step_batch
from qwenvl_jax.tree import flatten


def small(variant="lora", **over):
    """The tiny LoRA config at 32 tokens and a 512-word vocabulary (seconds per step on CPU)."""
    cfg = stage_config.load(f"sft:{variant},tiny,data=random")
    cfg.model.overrides.vocab_size = 512
    cfg.model.overrides.visual = {"n_queries": 16, "image_start_id": 500}
    cfg.data.seq_len = 32
    cfg.batch_size = 16  # 8 fake devices (conftest) x 2 micro-batches
    cfg.grad_accum = 2
    cfg.steps = 4
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.async_save = False
    cfg.optim.lr = 1e-2
    cfg.model.param_dtype = "float32"  # the float32 comparisons below
    return set_keys(cfg, **over)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A random tiny model saved as our checkpoint: the run's config.init.checkpoint."""
    cfg = small()
    cfg.lora.rank = 0  # the plain model
    s = build(cfg)
    d = str(tmp_path_factory.mktemp("base") / "ckpt")
    ours.save_params(d, jax.tree.map(np.asarray, init_params(s, 7)), model_config(cfg))
    return d


def _from(base_ckpt, cfg):
    cfg.init.checkpoint = base_ckpt
    cfg.init.allow_random = False
    return cfg


def _flat(tree):
    return flatten(jax.tree.map(np.asarray, tree))


def test_adapters_where_the_published_recipe_puts_them(base_ckpt):
    s = build(_from(base_ckpt, small()))
    paths = sorted(flatten(s.abstract_params))
    # scan_layers: one stacked module per target, a leading layer axis of 2.
    want = sorted(
        f"transformer.h.{m}.lora_{w}"
        for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2")
        for w in "AB"
    )
    assert paths == want
    shapes = {p: a.shape for p, a in flatten(s.abstract_params).items()}
    d, r = 256, 64
    assert shapes["transformer.h.attn.c_attn.lora_A"] == (2, d, r)
    assert shapes["transformer.h.attn.c_attn.lora_B"] == (2, r, 3, 4, 64)
    assert shapes["transformer.h.attn.c_proj.lora_A"] == (2, 4, 64, r)
    assert shapes["transformer.h.mlp.w2.lora_B"] == (2, r, 512)
    # Nothing of the visual tower, mlp.c_proj, wte or lm_head is trained.
    assert not any("visual" in p or "mlp.c_proj" in p for p in paths)


def test_lora_step_moves_only_adapters_and_keeps_base_bit_identical(base_ckpt):
    s = build(_from(base_ckpt, small()))
    params, _ = initial_params(s)
    _, want = ours.load_params(base_ckpt, scan_layers=True)
    opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
    # Optimizer state exists for the adapters only: Adam's mu and nu, one per adapter leaf.
    opt_shapes = sorted(x.shape for x in jax.tree.leaves(opt) if np.ndim(x))
    lora_shapes = sorted(a.shape for a in jax.tree.leaves(s.abstract_params))
    assert opt_shapes == sorted(lora_shapes * 2)
    step = make_train_step(s)
    from qwenvl_jax.data.random_batches import RandomBatches

    data = RandomBatches(s.cfg, s.mcfg, int(s.cfg.batch_size), 0)
    b0 = _flat(params)["transformer.h.attn.c_attn.lora_B"].copy()
    for _ in range(3):
        params, opt, m = step(params, opt, to_step_batch(next(data), s))
    assert np.all(np.isfinite(float(m["loss"])))
    assert not np.array_equal(_flat(params)["transformer.h.attn.c_attn.lora_B"], b0)
    got, ref = _flat(base_params(s)), _flat(want)
    assert set(got) == set(ref) - {p for p in ref if p.endswith((".lora_A", ".lora_B"))}
    for p, x in got.items():
        assert x.dtype == ref[p].dtype and np.array_equal(x, ref[p]), p


def test_modules_to_save_keep_float32_masters_and_the_step_compiles_once(base_ckpt):
    """The published base-model recipe (wte and lm_head trained) on a bf16 base at the published
    lr 1e-5: the trained leaves are float32 masters, so Adam's first steps (about lr each) move
    nearly every weight (a bf16 weight of this size rounds them away), and the step compiles once
    (Adam's moments no longer change dtype after step 1). The merged model keeps bf16."""
    from qwenvl_jax.data.random_batches import RandomBatches

    saved = (r"^transformer\.wte\.", r"^lm_head\.")
    cfg = _from(base_ckpt, small(**{"lora.modules_to_save": saved, "optim.lr": 1e-5}))
    cfg.model.param_dtype = "bfloat16"
    cfg.optim.warmup_steps = 0
    s = build(cfg)
    trained = flatten(s.abstract_params)
    assert {p: trained[p].dtype for p in ("lm_head.kernel", "transformer.wte.embedding")} == {
        "lm_head.kernel": np.float32, "transformer.wte.embedding": np.float32
    }  # fmt: skip
    assert flatten(s.abstract_base)["transformer.h.attn.c_attn.kernel"].dtype == jnp.bfloat16
    params, _ = initial_params(s)
    opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
    step = make_train_step(s)
    data = RandomBatches(s.cfg, s.mcfg, int(s.cfg.batch_size), 0)
    before = _flat(params)["lm_head.kernel"].copy()
    for _ in range(2):
        params, opt, _ = step(params, opt, to_step_batch(next(data), s))
    assert step._cache_size() == 1
    moved = np.mean(_flat(params)["lm_head.kernel"] != before)
    assert moved > 0.9, moved
    # In bf16 the same update leaves most of these weights (|w| ~ 0.02, ulp ~ 1e-4) unchanged.
    assert np.mean((before + 1e-5).astype(jnp.bfloat16) != before.astype(jnp.bfloat16)) < 0.5

    base = {"lm_head": {"kernel": before.astype(jnp.bfloat16)}, "transformer": {}}
    merged = lora.merge(base, {"lm_head": {"kernel": _flat(params)["lm_head.kernel"]}}, 0.25)
    assert merged["lm_head"]["kernel"].dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def lora_run(base_ckpt, tmp_path_factory):
    """A 4-step LoRA run, stopped after 2 and resumed."""
    from qwenvl_jax.train.loop import train

    wd = str(tmp_path_factory.mktemp("lora") / "wd")
    cfg = _from(base_ckpt, small())
    train(cfg, wd, stop_after=2)
    hist = train(cfg, wd)
    return cfg, wd, hist


def test_checkpoint_holds_only_adapters_and_their_optimizer_state(lora_run):
    from qwenvl_jax.checkpoint import _reader

    cfg, wd, _ = lora_run
    mngr = _reader(wd)
    assert sorted(mngr.all_steps()) == [2, 4]
    md = mngr.item_metadata(4)
    params = flatten(md["params"].tree if hasattr(md["params"], "tree") else md["params"])
    assert all(p.endswith((".lora_A", ".lora_B")) for p in params), sorted(params)
    assert len(params) == 8
    opt = md["opt_state"].tree if hasattr(md["opt_state"], "tree") else md["opt_state"]
    opt_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(opt) if len(x.shape))
    assert opt_shapes == sorted([tuple(x.shape) for x in params.values()] * 2)
    mngr.close()


def test_resume_equals_uninterrupted_run(lora_run, base_ckpt, tmp_path):
    from qwenvl_jax.convert.workdir import load_workdir_params
    from qwenvl_jax.train.loop import train

    cfg, wd, _ = lora_run
    train(cfg, str(tmp_path / "straight"))
    _, resumed, _ = load_workdir_params(wd)
    _, straight, _ = load_workdir_params(str(tmp_path / "straight"))
    a, b = _flat(resumed), _flat(straight)
    assert set(a) == set(b)
    for p in a:
        np.testing.assert_array_equal(a[p], b[p], err_msg=p)


def test_merged_export_equals_base_plus_adapter(lora_run, tmp_path):
    """The HF export of the workdir (adapters merged) run as a plain model gives the LoRA
    model's logits: float32, relative to the largest logit, <= 1e-5 (summation order only)."""
    from qwenvl_jax.convert import hf
    from qwenvl_jax.convert.__main__ import main as convert_main
    from qwenvl_jax.convert.workdir import load_workdir_params

    cfg, wd, _ = lora_run
    out = str(tmp_path / "merged")
    assert convert_main(["export", wd, out, "--no_tokenizer"]) == 0
    mcfg, merged = hf.import_hf(out, scan_layers=True)
    ids = np.random.default_rng(0).integers(0, 500, (2, 24)).astype(np.int32)

    plain_cfg = small()
    plain_cfg.lora.rank = 0
    sp = build(plain_cfg)
    want = np.asarray(merge_model(sp, merged)(ids), np.float32)

    s = build(cfg)
    _, trained, _ = load_workdir_params(wd)
    trained = checkpoint.stack_layers(trained)
    got = np.asarray(merge_model(s, trained, base_params(s))(ids), np.float32)
    # The adapters moved the logits (so the comparison is not base vs base).
    base_only = np.asarray(
        merge_model(sp, ours.load_params(cfg.init.checkpoint, scan_layers=True)[1])(ids)
    )
    assert np.abs(base_only - got).max() > 1e-3 * np.abs(got).max()
    assert np.abs(want - got).max() <= 1e-5 * np.abs(got).max()


def test_peft_adapter_export_keys_and_layout(lora_run, tmp_path):
    """PEFT's key names and torch layout: B @ A of the exported pair is our delta, flattened."""
    from safetensors.numpy import load_file

    from qwenvl_jax.convert.peft import export_peft
    from qwenvl_jax.convert.workdir import load_workdir_params

    cfg, wd, _ = lora_run
    export_peft(wd, str(tmp_path / "ad"))
    conf = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert conf["r"] == 64 and conf["lora_alpha"] == 16.0 and conf["lora_dropout"] == 0.05
    assert conf["target_modules"] == ["c_attn", "attn.c_proj", "w1", "w2"]
    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert len(t) == 2 * 4 * 2
    a = t["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    b = t["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    assert a.shape == (64, 256) and b.shape == (3 * 256, 64)
    _, trained, _ = load_workdir_params(wd)
    node = trained["transformer"]["h"][1]["attn"]["c_attn"]
    ours_delta = lora.delta(node["lora_A"], node["lora_B"], 1.0)  # [D, 3, N, H]
    # torch's c_attn weight [3 N H, D] is our kernel transposed with its output dims flattened.
    np.testing.assert_allclose(b @ a, ours_delta.reshape(256, -1).T, rtol=1e-5, atol=1e-7)


def test_lora_on_an_int8_base_in_the_layer_scan(base_ckpt):
    """config.lora.quantize_base="int8": the stacked decoder kernels are int8 with per-layer,
    per-output-channel scales made from the init checkpoint (absmax over D / 127, recomputed here),
    and a training step through the scanned blocks moves the adapters."""
    from qwenvl_jax.data.random_batches import RandomBatches

    s = build(_from(base_ckpt, small("qlora", **{"lora.quantize_base": "int8"})))
    params, _ = initial_params(s)
    base = _flat(base_params(s))
    _, src = ours.load_params(base_ckpt, scan_layers=True)
    w = _flat(src)["transformer.h.attn.c_attn.kernel"]  # [L, D, 3, N, H]
    assert base["transformer.h.attn.c_attn.kernel"].dtype == np.int8
    want = np.max(np.abs(w), axis=1, keepdims=True) / 127
    np.testing.assert_allclose(base["transformer.h.attn.c_attn.kernel_scale"], want, rtol=1e-6)
    opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
    step = make_train_step(s)
    data = RandomBatches(s.cfg, s.mcfg, int(s.cfg.batch_size), 0)
    b0 = _flat(params)["transformer.h.mlp.w2.lora_B"].copy()
    params, opt, m = step(params, opt, to_step_batch(next(data), s))
    assert np.isfinite(float(m["loss"]))
    assert not np.array_equal(_flat(params)["transformer.h.mlp.w2.lora_B"], b0)


def test_qlora_trains_and_loss_falls(base_ckpt, tmp_path):
    from qwenvl_jax.train.loop import train

    cfg = _from(base_ckpt, small("qlora", steps=20))
    cfg.checkpoint.every_steps = 100
    cfg.data.kind = "random"
    s = build(cfg)
    # The decoder kernels are 4-bit NF4 codes with block scales; the adapters are float32.
    base = flatten(s.abstract_base)
    assert base["transformer.h.attn.c_attn.kernel"].dtype == np.dtype("uint4")
    assert "transformer.h.mlp.c_proj.kernel_block_scale" in base
    hist = train(cfg, str(tmp_path / "q"))
    losses = [h["loss"] for h in hist]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses


@pytest.mark.parametrize("mode", ["int4", "nf4"])
def test_quantize_round_trip_error(mode):
    """Blockwise 4-bit: every value within half a step of its block's grid."""
    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    codec = variants.CODECS[mode]
    codes, scale = codec.encode(w, codec.scale_shape(w.shape, ()))
    back = np.asarray(codec.decode(codes, scale))
    absmax = np.abs(w.reshape(8, 2, 64)).max(-1, keepdims=True)
    if mode == "int4":
        bound = absmax / 7 / 2
    else:  # the widest gap between NF4 levels, halved
        bound = absmax * np.max(np.diff(variants.nf4_levels())) / 2
    assert np.all(np.abs(back - w).reshape(8, 2, 64) <= bound + 1e-6)


def test_nf4_levels_are_qloras():
    """The 16 NF4 levels (QLoRA paper, appendix E), as printed there to 4 decimals."""
    printed = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796,
               0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]  # fmt: skip
    np.testing.assert_allclose(variants.nf4_levels(), printed, atol=1e-4)


def test_config_errors_name_the_key():
    from qwenvl_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config\.lora\.quantize_base='int3'.*none\|.*int4"):
        build(small(**{"lora.quantize_base": "int3"}))
    with pytest.raises(ConfigError, match=r"config\.lora\.targets"):
        build(small(**{"lora.targets": (r"^nothing$",)}))
    with pytest.raises(ConfigError, match=r"config\.lora\.modules_to_save"):
        build(small(**{"lora.modules_to_save": (r"^nothing$",)}))
