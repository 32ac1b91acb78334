"""Parity with the published PyTorch Qwen-VL on tiny random models (float32, CPU).

Golden values were computed by running the published code (tools/make_reference_fixtures.py; see
tests/fixtures/reference/README.md). The fixture weights are regenerated here from their seeded
recipe, checked against the sha256 the reference run recorded, loaded through our importer into
our model, and the logits compared with the issue's criterion:

    max |ours - reference| <= 1e-4 * max |reference logit|

(1e-4 relative, fixed by the issue; float32 on both sides agrees to ~1e-6 here, so this is not a
loose bound: any mapping or math error moves logits by O(1)).
"""

import functools
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_weights import REF, reference_tensors

from qwenvl_jax.convert import assign_params, import_tensors
from qwenvl_jax.generate import generate
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwen import dynamic_ntk_alpha
from qwenvl_jax.model.qwenvl import QWenLMHeadModel
from qwenvl_jax.tokenizer import image_token_index

RTOL = 1e-4  # the criterion, relative to the largest reference logit


@functools.lru_cache(maxsize=2)
def load_model(name: str, scan_layers: bool):
    cfg, tensors = reference_tensors(name)
    # Built abstractly (no random init), then every parameter is filled from the checkpoint.
    model = nnx.eval_shape(
        lambda: QWenLMHeadModel(cfg, ModelOptions(scan_layers=scan_layers), rngs=nnx.Rngs(0))
    )
    assign_params(model, import_tensors(tensors, cfg, scan_layers=scan_layers))
    return cfg, model


@nnx.jit(static_argnames=("ntk_alpha", "use_logn"))
def _forward(model, ids, images, index, segment_ids, ntk_alpha, use_logn):
    return model(
        ids,
        images=images,
        image_token_index=index,
        segment_ids=segment_ids,
        ntk_alpha=ntk_alpha,
        use_logn=use_logn,
    )


def images_per_row(fx, counts: np.ndarray) -> np.ndarray | None:
    """The reference's pixel tensors (consumed in row-major span order) as [B, M, S, S, 3]."""
    if "pixel_values" not in fx:
        return None
    pv = fx["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    out = np.zeros((len(counts), int(counts.max())) + pv.shape[1:], np.float32)
    k = 0
    for b, n in enumerate(counts):
        out[b, :n] = pv[k : k + n]
        k += n
    assert k == len(pv)
    return out


def relative_error(name: str, scan_layers: bool, case: str) -> float:
    """Max |ours - reference| / max |reference logit| over the stored logits of a forward case."""
    cfg, model = load_model(name, scan_layers)
    fx = np.load(os.path.join(REF, f"{name}_{case}.npz"))
    ids, lengths = fx["input_ids"], fx["lengths"]
    B, T = ids.shape
    segment_ids = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    index, counts = image_token_index(ids, cfg.visual.image_start_id, cfg.visual.n_queries)
    images = images_per_row(fx, counts)
    logits = _forward(
        model,
        jnp.asarray(ids),
        None if images is None else jnp.asarray(images),
        None if images is None else jnp.asarray(index),
        jnp.asarray(segment_ids),
        # Inference mode, as the reference's model.eval(): NTK alpha from the prompt length.
        ntk_alpha=dynamic_ntk_alpha(T, cfg.seq_length),
        use_logn=True,
    )
    logits = np.asarray(logits, np.float32)
    full = np.stack([logits[b, p] for b, p in fx["full_positions"]])
    err_full = np.abs(full - fx["logits_full"]).max()
    real = segment_ids.astype(bool)
    sampled = logits[:, :, fx["sampled_columns"]]
    err_sampled = np.abs(sampled - fx["logits_sampled"])[real].max()
    return float(max(err_full, err_sampled) / fx["max_abs_logit"])


# (model, scan_layers, case). tiny uses per-layer modules, wide224 the stacked (scan) layout.
FAST = [
    ("tiny", False, "text"),
    ("tiny", False, "image1"),
    ("tiny", False, "image2"),
    ("tiny", False, "batch"),
    ("wide224", True, "text"),
    ("wide224", True, "image1"),
    ("wide224", True, "image2"),
]
SLOW = [
    ("tiny", False, "long"),
    ("tiny", False, "long_image"),
    ("wide224", True, "long"),
]


@pytest.mark.parametrize("name,scan_layers,case", FAST)
def test_logits_match_reference(name, scan_layers, case):
    err = relative_error(name, scan_layers, case)
    assert err <= RTOL, f"{name}/{case}: max relative logit error {err:.3g} > {RTOL}"


@pytest.mark.slow
@pytest.mark.parametrize("name,scan_layers,case", SLOW)
def test_long_prompt_logits_match_reference(name, scan_layers, case):
    """> 2048 tokens: dynamic NTK (alpha 3) and logn query scaling are active."""
    err = relative_error(name, scan_layers, case)
    assert err <= RTOL, f"{name}/{case}: max relative logit error {err:.3g} > {RTOL}"


@pytest.mark.parametrize("name,scan_layers", [("tiny", False), ("wide224", True)])
def test_image_features_match_reference(name, scan_layers):
    """The visual tower alone (ViT + resampler + proj) against the reference's visual output."""
    _, model = load_model(name, scan_layers)
    fx = np.load(os.path.join(REF, f"{name}_image2.npz"))
    images = jnp.asarray(fx["pixel_values"].transpose(0, 2, 3, 1)[None])
    feats = np.asarray(nnx.jit(lambda m, x: m.transformer.encode_images(x))(model, images))
    ref = fx["image_features"].reshape(feats.shape)
    err = np.abs(feats - ref).max() / np.abs(ref).max()
    assert err <= RTOL, f"{name}: visual features relative error {err:.3g}"


def test_pipeline_inputs_match_reference(monkeypatch):
    """Our tokenizer and image loader give the ids and pixels the reference model consumed."""
    from qwenvl_jax.image import load_image
    from qwenvl_jax.tokenizer import load_tokenizer

    monkeypatch.chdir(REF)  # the prompts name the images by relative path, as in the fixture run
    tok = load_tokenizer()
    one = "Picture 1: <img>img_a.png</img>\nWhat is in this picture? 图中有什么？"
    fx = np.load("tiny_image1.npz")
    assert tok.encode(one) == fx["input_ids"][0].tolist()
    for name, size in (("tiny", 56), ("wide224", 224)):
        fx = np.load(f"{name}_image2.npz")
        got = np.stack([load_image(p, size) for p in ("img_a.png", "img_b.jpg")])
        np.testing.assert_allclose(got, fx["pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)


# ----------------------------------------------------------------------------- generation
GENERATIONS = [
    ("tiny", False, "chat_text"),
    ("tiny", False, "chat_image"),
    ("wide224", True, "chat_text"),
    ("wide224", True, "chat_image"),
]


def _generate(name, scan_layers, case):
    cfg, model = load_model(name, scan_layers)
    fx = np.load(os.path.join(REF, f"{name}_gen_{case}.npz"))
    prompt = fx["prompt_ids"].tolist()
    images = None
    if case == "chat_image":
        img = np.load(os.path.join(REF, f"{name}_image1.npz"))["pixel_values"]
        images = img.transpose(0, 2, 3, 1)  # [M, S, S, 3]: the same image as in image1
    new = generate(
        model,
        prompt,
        images=images,
        max_new_tokens=len(fx["new_ids"]),
        do_sample=False,
        stop_words_ids=[[int(s)] for s in fx["stop_words_ids"]],
    )
    return list(new), fx["new_ids"].tolist()


@pytest.mark.parametrize("name,scan_layers,case", GENERATIONS)
def test_greedy_generation_matches_reference(name, scan_layers, case):
    got, want = _generate(name, scan_layers, case)
    assert got == want


@pytest.mark.slow
def test_greedy_generation_long_prompt_matches_reference():
    """Decoding after a 2100-token prompt reuses the prefill's NTK alpha, as the reference does."""
    got, want = _generate("tiny", False, "long")
    assert got == want
