"""Optimizer: the paper's schedules, layer-wise LR decay, freezing without state, the weight-decay
mask."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwenvl_jax import optim
from qwenvl_jax.train import stage_config
from qwenvl_jax.train.model_axis import CHOICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
    return stage_config.load(f"{name}:{arg}" if arg else name)


def cosine(peak, lo, warm, total, n):
    """Hand formula of the paper's schedule (1-based step n)."""
    if n <= warm:
        return peak * n / warm
    return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * (n - warm) / (total - warm)))


# Table 8 values typed from the paper, independent of the config files.
TABLE8 = {
    "pretrain": dict(lr=2e-4, min_lr=1e-6, warm=500, steps=50_000, batch=30_720, acc=6, mp=1),
    "multitask": dict(lr=5e-5, min_lr=1e-5, warm=400, steps=19_000, batch=4096, acc=8, mp=2),
    "sft": dict(lr=1e-5, min_lr=1e-6, warm=3000, steps=8000, batch=128, acc=8, mp=2),
}


@pytest.mark.parametrize("stage", sorted(TABLE8))
def test_configs_reproduce_table8(stage):
    t = TABLE8[stage]
    c = load_config(stage)
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_steps) == (t["lr"], t["min_lr"], t["warm"])
    assert (c.steps, c.optim.total_steps, c.batch_size, c.grad_accum) == (
        t["steps"],
        t["steps"],
        t["batch"],
        t["acc"],
    )
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.98, 1e-6)
    assert (c.optim.weight_decay, c.optim.grad_clip) == (0.05, 1.0)
    # The 7B stages' "auto" falls back to Table 8's 2 (1 only where the step fits as well:
    # train/model_axis.py, tests/train/test_model_axis.py).
    assert c.mesh.model == t["mp"] or (c.mesh.model == "auto" and CHOICES[-1] == t["mp"])
    assert c.data.image_size == (224 if stage == "pretrain" else 448)
    assert c.data.seq_len == (512 if stage == "pretrain" else 2048)
    assert c.model.overrides.visual.n_queries == 256


@pytest.mark.parametrize("stage", sorted(TABLE8))
def test_schedule_matches_paper_at_chosen_steps(stage):
    t = TABLE8[stage]
    c = load_config(stage)
    sched = optim.lr_schedule(c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.total_steps)
    mid = t["warm"] + (t["steps"] - t["warm"]) // 2
    checks = {
        1: t["lr"] / t["warm"],
        t["warm"] // 2: t["lr"] / 2,
        t["warm"]: t["lr"],  # the peak, at the end of warm-up
        mid: (t["lr"] + t["min_lr"]) / 2,  # half way through the cosine
        t["steps"]: t["min_lr"],  # the minimum at the last step
        t["steps"] + 100: t["min_lr"],
    }
    for n, want in checks.items():
        np.testing.assert_allclose(float(sched(n - 1)), want, rtol=1e-5, err_msg=f"step {n}")
        np.testing.assert_allclose(
            float(sched(n - 1)),
            cosine(t["lr"], t["min_lr"], t["warm"], t["steps"], min(n, t["steps"])),
            rtol=1e-5,
        )


def fake_params(L=4, stacked=False):
    """Paths as the model lays them out; values irrelevant to the labels."""
    blk = {
        "attn": {
            "in_proj": {
                "kernel": np.zeros((8, 2, 3, 4), np.float32),
                "bias": np.zeros((2, 3, 4), np.float32),
            }
        },
        "ln_1": {"scale": np.zeros((8,), np.float32)},
    }
    if stacked:
        blocks = jax.tree.map(lambda x: np.zeros((L,) + x.shape, np.float32), blk)
    else:
        blocks = {str(i): jax.tree.map(np.copy, blk) for i in range(L)}
    return {
        "transformer": {
            "wte": {"embedding": np.zeros((16, 8), np.float32)},
            "h": {"0": {"mlp": {"w1": {"kernel": np.zeros((8, 8), np.float32)}}}},
            "ln_f": {"scale": np.zeros((8,), np.float32)},
            "visual": {
                "conv1": {"kernel": np.zeros((2, 2, 3, 8), np.float32)},
                "positional_embedding": np.zeros((4, 8), np.float32),
                "transformer": {"resblocks": blocks},
                "attn_pool": {
                    "query": np.zeros((4, 8), np.float32),
                    "pos_embed": np.zeros((4, 8), np.float32),
                    "kv_proj": {"kernel": np.zeros((8, 8), np.float32)},
                },
                "proj": np.zeros((8, 8), np.float32),
            },
        },
        "lm_head": {"kernel": np.zeros((8, 16), np.float32)},
    }


def base_cfg(**kw):
    cfg = dict(
        lr=1e-3,
        min_lr=1e-3,
        warmup_steps=0,
        total_steps=100,
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.0,
        grad_clip=0.0,
        vit_lr_decay=0.95,
        freeze=(),
    )
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("stacked", [False, True])
def test_vit_layerwise_lr_follows_decay_power(stacked):
    L = 4
    params = fake_params(L, stacked)
    tx, _, _ = optim.make_optimizer(base_cfg(), params)
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -lr * g / (|g| + eps) = -lr / (1 + eps) per element, times the layer
    # factor.
    base = -1e-3 / (1 + 1e-6)
    blocks = updates["transformer"]["visual"]["transformer"]["resblocks"]
    for k in range(L):
        blk = jax.tree.map(lambda x, k=k: x[k], blocks) if stacked else blocks[str(k)]
        for leaf in jax.tree.leaves(blk):
            np.testing.assert_allclose(np.asarray(leaf), base * 0.95 ** (L - k), rtol=1e-6)
    vis = updates["transformer"]["visual"]
    np.testing.assert_allclose(vis["conv1"]["kernel"], base * 0.95 ** (L + 1), rtol=1e-6)
    np.testing.assert_allclose(vis["positional_embedding"], base * 0.95 ** (L + 1), rtol=1e-6)
    for leaf in [
        vis["proj"],
        vis["attn_pool"]["query"],
        updates["lm_head"]["kernel"],
        updates["transformer"]["h"]["0"]["mlp"]["w1"]["kernel"],
    ]:
        np.testing.assert_allclose(np.asarray(leaf), base, rtol=1e-6)


def test_group_lr_scale_multiplies_the_layerwise_decay():
    L = 2
    params = fake_params(L, stacked=True)
    cfg = base_cfg()
    cfg["lr_scale"] = {"adapter": 0.1, r"^transformer\.visual\.transformer\.": 0.5}
    tx, _, _ = optim.make_optimizer(cfg, params)
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    base = -1e-3 / (1 + 1e-6)
    vis = updates["transformer"]["visual"]
    for leaf in jax.tree.leaves(vis["attn_pool"]):
        np.testing.assert_allclose(np.asarray(leaf), base * 0.1, rtol=1e-6)
    blocks = vis["transformer"]["resblocks"]
    for k in range(L):
        for leaf in jax.tree.leaves(jax.tree.map(lambda x, k=k: x[k], blocks)):
            np.testing.assert_allclose(np.asarray(leaf), base * 0.5 * 0.95 ** (L - k), rtol=1e-6)
    np.testing.assert_allclose(vis["proj"], base, rtol=1e-6)
    np.testing.assert_allclose(updates["lm_head"]["kernel"], base, rtol=1e-6)


@pytest.mark.parametrize(
    "scale, match", [({"adapter": 0.0}, "must be > 0"), ({"adaptr": 0.5}, "match no")]
)
def test_bad_group_lr_scale_is_an_error(scale, match):
    cfg = base_cfg()
    cfg["lr_scale"] = scale
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(cfg, fake_params(2))


def test_frozen_params_have_no_state_and_zero_update():
    params = fake_params(2, stacked=True)
    tx, labels, _ = optim.make_optimizer(base_cfg(freeze=("llm", "adapter_pos_embed")), params)
    state = tx.init(params)
    n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    counts = optim.count_params(params, labels)
    # Adam keeps mu and nu for exactly the trainable parameters.
    assert n_state == 2 * counts["train"]
    assert counts["frozen"] == 16 * 8 + 8 * 8 + 8 + 8 * 16 + 4 * 8
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert labels["transformer"]["visual"]["attn_pool"]["pos_embed"] == "frozen"
    assert labels["transformer"]["visual"]["attn_pool"]["query"] == "train"
    for u, lab in zip(jax.tree.leaves(updates), jax.tree.leaves(labels), strict=True):
        assert (np.asarray(u) == 0).all() == (lab == "frozen")


def test_sft_freezes_vit_trunk_ln_post_and_proj_not_adapter():
    labels = optim.frozen_labels(fake_params(2), ["vit"])
    v = labels["transformer"]["visual"]
    assert v["proj"] == v["conv1"]["kernel"] == v["positional_embedding"] == "frozen"
    assert v["attn_pool"]["pos_embed"] == v["attn_pool"]["kv_proj"]["kernel"] == "train"
    assert labels["lm_head"]["kernel"] == "train"


def test_unknown_freeze_pattern_is_an_error():
    with pytest.raises(ValueError, match="match no parameter"):
        optim.frozen_labels(fake_params(2), ["llm", "transformer\\.visal"])


def test_weight_decay_mask_and_value():
    params = jax.tree.map(lambda x: np.full_like(x, 2.0), fake_params(2))
    mask = optim.decay_mask(params)
    assert mask["transformer"]["wte"]["embedding"] and mask["lm_head"]["kernel"]
    assert mask["transformer"]["visual"]["proj"]
    assert not mask["transformer"]["ln_f"]["scale"]
    assert not mask["transformer"]["visual"]["positional_embedding"]
    assert not mask["transformer"]["visual"]["attn_pool"]["query"]
    assert not mask["transformer"]["visual"]["transformer"]["resblocks"]["0"]["attn"]["in_proj"][
        "bias"
    ]
    # AdamW with zero gradients: the update is -lr * wd * p on decayed leaves, 0 elsewhere.
    tx, _, _ = optim.make_optimizer(base_cfg(weight_decay=0.05, vit_lr_decay=1.0), params)
    upd, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(upd["lm_head"]["kernel"], -1e-3 * 0.05 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(upd["transformer"]["ln_f"]["scale"], 0.0)


def test_global_norm_clip():
    params = {"lm_head": {"kernel": np.zeros((2, 2), np.float32)}}
    cfg = base_cfg(grad_clip=1.0, vit_lr_decay=1.0)
    tx, _, _ = optim.make_optimizer(cfg, params)
    g = {"lm_head": {"kernel": np.full((2, 2), 3.0, np.float32)}}  # norm 6 -> scaled by 1/6
    clipped, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)
    st = tx.init(params)
    # Adam's first moment after the clip: mu = (1 - b1) * g / 6.
    _, st = tx.update(g, st, params)
    mu = jax.tree.leaves(st, is_leaf=lambda x: hasattr(x, "mu"))
    mus = [s.mu for s in mu if hasattr(s, "mu")]
    np.testing.assert_allclose(mus[0]["lm_head"]["kernel"], 0.1 * 0.5, rtol=1e-6)


def test_schedule_rejects_bad_warmup():
    with pytest.raises(ValueError):
        optim.lr_schedule(1.0, 0.1, 10, 10)
    assert jnp.isfinite(optim.lr_schedule(1.0, 0.1, 0, 10)(0))


def test_total_steps_follows_steps_override():
    c = load_config("multitask")
    c.steps = 123
    assert c.optim.total_steps == 123


@pytest.mark.parametrize("stage", sorted(TABLE8))
def test_unknown_config_variant_is_an_error(stage):
    assert load_config(stage, "tiny,res=112").data.image_size == 112
    with pytest.raises(ValueError, match=r"unknown variant key\(s\) \['tiyn'\]"):
        load_config(stage, "tiyn")
