"""Generation tests on a small tiny-preset model: cached decoding against full re-computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import generate as gen
from qwenvl_jax.config import get_preset
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwen import dynamic_ntk_alpha
from qwenvl_jax.model.qwenvl import QWenLMHeadModel
from qwenvl_jax.tokenizer import image_token_index

CFG = get_preset("tiny", vocab_size=1000, visual={"image_start_id": 990})
IMG = CFG.visual.image_start_id
EOS = 999


def _build(cfg, seed):
    # Initialised under one jit: far faster on CPU than op-by-op eager initialisation.
    return nnx.jit(
        lambda: QWenLMHeadModel(cfg, ModelOptions(scan_layers=True), rngs=nnx.Rngs(seed))
    )()


@pytest.fixture(scope="module")
def model():
    return _build(CFG, 7)


@pytest.fixture(scope="module")
def full_forward():
    return nnx.jit(
        lambda m, ids, imgs, idx, alpha: m(
            ids, images=imgs, image_token_index=idx, ntk_alpha=alpha, use_logn=True
        ),
        static_argnums=4,
    )


def _greedy_by_recomputation(model, fwd, prompt, n, images=None, seq_length=2048):
    """Greedy decoding that re-runs the whole uncached forward for every new token."""
    seq = list(prompt)
    alpha = dynamic_ntk_alpha(len(prompt), seq_length)  # fixed at prefill, as the reference
    for _ in range(n):
        ids = np.asarray([seq], np.int32)
        idx = None
        if images is not None:
            idx = jnp.asarray(image_token_index(ids, IMG, 256)[0])
        logits = fwd(model, jnp.asarray(ids), images, idx, alpha)
        seq.append(int(np.argmax(np.asarray(logits[0, -1]))))
    return seq[len(prompt) :]


def _prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 900, n)]


def test_greedy_cached_equals_recomputation(model, full_forward):
    prompt = _prompt(0, 9)
    expect = _greedy_by_recomputation(model, full_forward, prompt, 6)
    assert gen.generate(model, prompt, max_new_tokens=6, eos_token_id=EOS) == expect


def test_greedy_with_image_and_ntk_logn(full_forward):
    # seq_length=16: the 270-token prompt gets NTK alpha 63 and logn acts in every decode step.
    cfg = CFG.replace(seq_length=16)
    assert dynamic_ntk_alpha(270, 16) == 63.0
    m = _build(cfg, 8)
    prompt = _prompt(1, 5) + [IMG] + [IMG + 2] * 256 + [IMG + 1] + _prompt(2, 6)
    s = cfg.visual.image_size
    images = np.random.default_rng(3).normal(size=(1, s, s, 3)).astype(np.float32)
    expect = _greedy_by_recomputation(
        m, full_forward, prompt, 5, images=jnp.asarray(images)[None], seq_length=16
    )
    got = gen.generate(m, prompt, images=images, max_new_tokens=5, eos_token_id=EOS)
    assert got == expect


def test_batch_with_left_padding_matches_single_rows(model):
    a, b = _prompt(4, 11), _prompt(5, 6)
    singles = [gen.generate(model, p, max_new_tokens=5, eos_token_id=EOS) for p in (a, b)]
    # The padded row's rotary positions count its padding (as in the reference's batched
    # generation); rotary scores depend only on position differences and padding is masked, so
    # its greedy tokens equal the unpadded run.
    batch = gen.generate(model, [a, b], max_new_tokens=5, eos_token_id=EOS)
    assert batch == singles


def test_batch_with_different_image_counts_matches_single_rows(model):
    span = [IMG] + [IMG + 2] * 256 + [IMG + 1]
    one = _prompt(12, 3) + span + _prompt(13, 2)  # one image, mid-prompt
    two = _prompt(14, 2) + span + _prompt(15, 1) + span  # two images, the last at the very end
    s = CFG.visual.image_size
    imgs = np.random.default_rng(16).normal(size=(3, s, s, 3)).astype(np.float32)
    singles = [
        gen.generate(model, one, images=imgs[:1], max_new_tokens=4, eos_token_id=EOS),
        gen.generate(model, two, images=imgs[1:], max_new_tokens=4, eos_token_id=EOS),
    ]
    # Row 0 fills one of the two image slots; its second slot holds an unrelated image that no
    # span points at (it must not leak into the row).
    batch_imgs = np.stack([imgs[[0, 2]], imgs[1:]])
    batch = gen.generate(model, [one, two], images=batch_imgs, max_new_tokens=4, eos_token_id=EOS)
    assert batch == singles
    # The images matter: other pixels for row 1's last image change its continuation.
    other = batch_imgs.copy()
    other[1, 1] = -other[1, 1]
    changed = gen.generate(model, [one, two], images=other, max_new_tokens=4, eos_token_id=EOS)
    assert changed[0] == singles[0] and changed[1] != singles[1]


def test_stop_words_force_eos_and_eos_stops(model):
    prompt = _prompt(6, 8)
    free = gen.generate(model, prompt, max_new_tokens=6, eos_token_id=EOS)
    assert EOS not in free
    # A stop word seen at the end of the sequence forces eos next; eos ends generation.
    stop = free[1:3]
    seq = prompt + free
    first = next(j for j in range(len(free)) if seq[: len(prompt) + j + 1][-2:] == stop)
    stopped = gen.generate(model, prompt, max_new_tokens=6, eos_token_id=EOS, stop_words_ids=[stop])
    assert stopped == free[: first + 1] + [EOS]
    i = next(i for i in range(1, 6) if free[i] not in free[:i])
    assert gen.generate(model, prompt, max_new_tokens=6, eos_token_id=free[i]) == free[: i + 1]
    # A stop word that never occurs changes nothing.
    assert (
        gen.generate(model, prompt, max_new_tokens=6, eos_token_id=EOS, stop_words_ids=[[EOS]])
        == free
    )


def test_no_recompilation_per_token(model):
    prompt = _prompt(9, 10)
    gen.generate(model, prompt, max_new_tokens=3, eos_token_id=EOS)  # warm up this shape
    kw = dict(do_sample=True, top_k=5, eos_token_id=EOS)
    gen.generate(model, prompt, max_new_tokens=3, rng=jax.random.key(0), **kw)
    sizes = (gen._prefill._cache_size(), gen._decode._cache_size())
    # More tokens, a different prompt of the same bucket: no new compilation anywhere.
    out = gen.generate(model, _prompt(10, 12), max_new_tokens=12, eos_token_id=EOS)
    assert len(out) == 12
    # Sampling with another key, temperature and top_p reuses the sampling compilation.
    gen.generate(
        model, prompt, max_new_tokens=5, rng=jax.random.key(1), temperature=0.7, top_p=0.8, **kw
    )
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == sizes


def test_warpers_match_hand_computation():
    probs = np.array([[0.05, 0.15, 0.3, 0.5]], np.float32)
    logits = jnp.log(jnp.asarray(probs))

    def kept(top_k, top_p, temperature=1.0):
        out = gen.warp_logits(logits, jnp.float32(temperature), top_k, jnp.float32(top_p))
        return np.isfinite(np.asarray(out[0])).tolist()

    # top-p: ascending cumulative probs [0.05, 0.2, 0.5, 1.0]; drop those <= 1 - top_p.
    assert kept(0, 0.75) == [False, False, True, True]
    assert kept(0, 0.9) == [False, True, True, True]
    assert kept(0, 0.1) == [False, False, False, True]  # at least one token survives
    assert kept(0, 1.0) == [True, True, True, True]
    # top-k before top-p: k=2 keeps {0.3, 0.5}; renormalised [0.375, 0.625]; top_p=0.5 drops 0.375.
    assert kept(2, 1.0) == [False, False, True, True]
    assert kept(2, 0.5) == [False, False, False, True]
    # Temperature divides the logits.
    out = gen.warp_logits(logits, jnp.float32(2.0), 0, jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(out), np.log(probs) / 2, rtol=1e-6)


def test_sampling_respects_filters_and_seed(model):
    logits = jnp.log(jnp.asarray([[0.05, 0.15, 0.3, 0.5]] * 64, jnp.float32))
    draws = gen._select(
        logits, jax.random.key(1), jnp.float32(1.0), jnp.float32(0.75), do_sample=True, top_k=0
    )
    assert set(np.asarray(draws).tolist()) == {2, 3}
    prompt = _prompt(11, 7)
    kw = dict(max_new_tokens=4, do_sample=True, top_k=20, top_p=0.9, eos_token_id=EOS)
    one = gen.generate(model, prompt, rng=jax.random.key(3), **kw)
    assert one == gen.generate(model, prompt, rng=jax.random.key(3), **kw)


def test_bad_inputs():
    m = nnx.eval_shape(lambda: QWenLMHeadModel(CFG, ModelOptions(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(m, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        gen.generate(m, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate(m, [[1, 2], [3, 1000]], max_new_tokens=2)
    with pytest.raises(ValueError, match="no images were given"):
        gen.generate(m, [1, IMG] + [IMG + 2] * 256 + [IMG + 1], max_new_tokens=2)
    with pytest.raises(ValueError, match="do not cover"):
        s = CFG.visual.image_size
        two_spans = ([IMG] + [IMG + 2] * 256 + [IMG + 1]) * 2
        gen.generate(m, two_spans, images=np.zeros((1, s, s, 3)), max_new_tokens=2)
