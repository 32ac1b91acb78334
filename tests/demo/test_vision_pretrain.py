"""Stage 0 of the demo: per-token targets, training, the checkpoint and its reuse."""

import json
import os

import numpy as np

from qwenvl_jax.config import get_preset
from qwenvl_jax.convert import ours
from qwenvl_jax.demo import synthetic, vision_pretrain
from qwenvl_jax.demo.synthetic import Obj, Scene


def test_token_targets_name_what_lies_under_each_token_centre():
    # 60 px picture, 3 x 3 tokens: token centres at 10, 30, 50 px on each axis.
    scene = Scene(
        size=60,
        background=(250, 250, 250),
        objects=(
            Obj("circle", "blue", (0, 0, 40, 20)),  # covers centres x 10, 30; y 10
            Obj("word", "black", (45, 45, 58, 56), text="sun"),  # covers centre (50, 50)
        ),
    )
    cls, word, box = vision_pretrain.token_targets(scene, grid=3)
    blue_circle = 2 + 0 * 5 + 2  # circle is shape 0, blue colour 2 of (red, green, blue, ...)
    assert cls.tolist() == [blue_circle, blue_circle, 0, 0, 0, 0, 0, 0, 1]
    assert word.tolist() == [-1] * 8 + [synthetic.WORDS.index("sun")]
    np.testing.assert_allclose(box[0], [0, 0, 40 / 60, 20 / 60])
    np.testing.assert_allclose(box[8], [45 / 60, 45 / 60, 58 / 60, 56 / 60])
    assert not box[2:8].any()


def _tiny_cfg():
    return get_preset(
        "tiny",
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        kv_channels=32,
        intermediate_size=128,
        initializer_range=0.08,
        visual=dict(width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=64, patch_size=14,
                    n_queries=16, image_size=56),
    )  # fmt: skip


def test_stage0_learns_trains_only_the_visual_tower_and_is_reused(tmp_path):
    cfg = _tiny_cfg()
    out = str(tmp_path / "stage0")
    settings = vision_pretrain.PretrainSettings(
        steps=150, batch_size=16, lr=3e-3, n_eval=64, log_every=50
    )
    lines = []
    got = vision_pretrain.pretrain_visual(cfg, out, settings, seed=3, progress=lines.append)
    assert len(lines) == 4 and "stage0 step 150/150" in lines[-1]
    losses = [v for _, v in got["curve"]]
    assert losses[-1] < 0.7 * losses[0], losses
    # After 150 steps the tokens on nothing are told apart from tokens on an object.
    assert got["metrics"]["empty"] > 0.8, got["metrics"]

    # A full checkpoint: the decoder is the seed's random init, the visual tower moved.
    from flax import nnx

    from qwenvl_jax.model.options import ModelOptions
    from qwenvl_jax.model.qwenvl import QWenLMHeadModel

    saved_cfg, params = ours.load_params(out)
    assert saved_cfg.visual == cfg.visual
    fresh = nnx.to_pure_dict(
        nnx.state(QWenLMHeadModel(cfg, ModelOptions(), rngs=nnx.Rngs(3)), nnx.Param)
    )
    np.testing.assert_array_equal(
        params["transformer"]["wte"]["embedding"], fresh["transformer"]["wte"]["embedding"]
    )
    np.testing.assert_array_equal(params["lm_head"]["kernel"], fresh["lm_head"]["kernel"])
    for key in ("conv1", "attn_pool"):
        a = params["transformer"]["visual"][key]
        b = fresh["transformer"]["visual"][key]
        assert any(
            not np.array_equal(x, y) for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True)
        ), key
    with open(os.path.join(out, vision_pretrain.METRICS_FILE)) as f:
        assert json.load(f)["steps"] == 150

    # Done: a second call reuses it without training.
    again = []
    assert vision_pretrain.pretrain_visual(cfg, out, settings, progress=again.append) == got
    assert len(again) == 1 and "already done" in again[0]


def test_unfinished_stage0_is_rerun_and_says_so(tmp_path):
    out = tmp_path / "stage0"
    out.mkdir()
    (out / "leftover.txt").write_text("an interrupted run")
    settings = vision_pretrain.PretrainSettings(steps=2, batch_size=2, n_eval=4)
    lines = []
    vision_pretrain.pretrain_visual(_tiny_cfg(), str(out), settings, progress=lines.append)
    assert "holds no finished checkpoint" in lines[0]
    assert ours.is_ours(str(out)) and not (out / "leftover.txt").exists()
    assert not os.path.exists(str(out) + ".partial")


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
