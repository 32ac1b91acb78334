"""Autoregressive generation with a preallocated KV cache: one prefill, then 1-token decode steps.

Both steps are `jax.jit`-compiled once per shape: prompts are right-padded to a multiple of
`prefill_bucket` (padding sits after the real tokens, so causal attention never sees it, and decode
overwrites those cache slots) and the cache length is rounded up to a multiple of `cache_bucket`.
Dynamic NTK (alpha from the prompt length, fixed at prefill) and logn scaling follow the config's
`use_dynamic_ntk` / `use_logn_attn`, as the reference does at inference. Alpha is a static
argument, so prompts past `seq_length` add one compilation per alpha value (3, 7, 15, ...).

Batches of prompts with different lengths are left-padded with segment id 0, and rotary positions
count the padding, as the reference's batched generation does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.model.qwen import inference_scaling, init_cache
from qwenvl_jax.model.qwenvl import QWenLMHeadModel, image_token_index

EOD_ID = 151643  # <|endoftext|>, the eos of Qwen-VL's generation_config


# Token selection is compiled into the prefill and decode steps, so each generated token costs one
# dispatch and one host transfer of B ids (the host applies stop words and eos between steps).
_STATIC = ("graphdef", "ntk_alpha", "use_logn", "do_sample", "top_k")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _prefill(graphdef, state, input_ids, segment_ids, images, token_index, cache, last, rng,
             temperature, top_p, *, ntk_alpha, use_logn, do_sample, top_k):  # fmt: skip
    """The prompt through the model; returns (the first new token int32 [B], the filled cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(
        input_ids,
        images=images,
        image_token_index=token_index,
        segment_ids=segment_ids,
        cache=cache,
        cache_index=0,
        ntk_alpha=ntk_alpha,
        use_logn=use_logn,
    )
    key = jax.random.fold_in(rng, 0)
    chosen = _select(logits[:, last].astype(jnp.float32), key, temperature, top_p,
                     do_sample=do_sample, top_k=top_k)  # fmt: skip
    return chosen, cache


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode(graphdef, state, tokens, cache, index, step, rng, temperature, top_p, *, ntk_alpha,
            use_logn, do_sample, top_k):  # fmt: skip
    """One token per row written at cache slot `index`; returns (token `step` int32 [B], cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(
        tokens[:, None],
        cache=cache,
        cache_index=index,
        ntk_alpha=ntk_alpha,
        use_logn=use_logn,
    )
    key = jax.random.fold_in(rng, step)
    chosen = _select(logits[:, 0].astype(jnp.float32), key, temperature, top_p,
                     do_sample=do_sample, top_k=top_k)  # fmt: skip
    return chosen, cache


def warp_logits(logits: jax.Array, temperature, top_k: int, top_p) -> jax.Array:
    """HF's sampling warpers in HF's order: temperature, then top-k, then top-p (keep >= 1 token).

    Args:
      logits: float32 [B, V]. temperature: > 0. top_k: 0 = off. top_p: 1.0 = off.

    Returns:
      [B, V] logits with removed tokens at -inf.
    """
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(logits, axis=-1)  # ascending, as HF's TopPLogitsWarper
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted = remove_sorted.at[..., -1].set(False)
    remove = (
        jnp.zeros_like(remove_sorted)
        .at[jnp.arange(logits.shape[0])[:, None], order]
        .set(remove_sorted)
    )
    return jnp.where(remove & (top_p < 1.0), -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("do_sample", "top_k"))
def _select(logits, key, temperature, top_p, *, do_sample, top_k):
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, warped, axis=-1).astype(jnp.int32)


def _ends_with(seq: list[int], stops: Sequence[Sequence[int]]) -> bool:
    return any(len(s) <= len(seq) and list(seq[len(seq) - len(s) :]) == list(s) for s in stops)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def generate(
    model: QWenLMHeadModel,
    input_ids,
    *,
    images=None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_words_ids: Sequence[Sequence[int]] = (),
    eos_token_id: int = EOD_ID,
    rng: jax.Array | None = None,
    prefill_bucket: int = 64,
    cache_bucket: int = 128,
):
    """Generate continuations of one prompt or a batch of prompts.

    Args:
      model: the QWenLMHeadModel.
      input_ids: one prompt (a list of ids or a 1-D array) or a batch (list of lists, or [B, T]).
        Image spans (`<img>` + n_queries ids + `</img>`) are located with `image_token_index`.
      images: float32 [M, S, S, 3] (one prompt) or [B, M, S, S, 3], CLIP-normalised; image m of a
        row fills that row's m-th span. None for text only.
      max_new_tokens: the most tokens generated per row (a forced eos counts).
      do_sample: sample (with temperature, top_k, top_p as HF's warpers) instead of greedy.
      stop_words_ids: id sequences; once the sequence ends with one of them the next token is
        forced to eos_token_id, as the reference's StopWordsLogitsProcessor does.
      eos_token_id: generation stops after this id (it is included in the output).
      rng: a jax PRNG key for sampling (default key 0).
      prefill_bucket, cache_bucket: shape rounding that bounds the number of compilations.

    Returns:
      The new ids: list[int] for one prompt, list[list[int]] for a batch (each up to and
      including eos, or max_new_tokens long).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if isinstance(input_ids, list | tuple):
        single = not (input_ids and isinstance(input_ids[0], list | tuple | np.ndarray))
    else:
        single = np.ndim(input_ids) == 1
    rows = [list(map(int, input_ids))] if single else [list(map(int, r)) for r in input_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate needs non-empty prompts")
    cfg = model.config
    bsz = len(rows)
    prompt_len = max(len(r) for r in rows)
    padded_len = _round_up(prompt_len, prefill_bucket)
    ids = np.zeros((bsz, padded_len), np.int32)
    seg = np.zeros((bsz, padded_len), np.int32)
    # QWEN-QUIRK: rotary positions ignore the padding mask (arange over the padded row), so a
    # left-padded row's tokens sit at shifted positions, as in the reference's batched generation.
    for b, r in enumerate(rows):  # left-pad to the longest prompt, right-pad to the bucket
        ids[b, prompt_len - len(r) : prompt_len] = r
        seg[b, prompt_len - len(r) : prompt_len] = 1
    bad = [(b, t) for b, r in enumerate(rows) for t in r if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(
            f"prompt ids outside the vocabulary [0, {cfg.vocab_size}): (row, id) {bad[:5]}"
        )
    token_index = None
    if images is None and any(cfg.visual.image_start_id in r for r in rows):
        raise ValueError(
            "the prompt holds <img> spans but no images were given: pass images=[M, S, S, 3] "
            "(or [B, M, S, S, 3]) in span order"
        )
    if images is not None:
        images = jnp.asarray(images, jnp.float32)
        if single:
            images = images[None]
        token_index, counts = image_token_index(
            ids, cfg.visual.image_start_id, cfg.visual.n_queries
        )
        if images.ndim != 5 or images.shape[0] != bsz or (counts > images.shape[1]).any():
            raise ValueError(
                f"images of shape {images.shape} do not cover the prompts' image spans "
                f"(spans per row: {counts.tolist()})"
            )
        token_index = jnp.asarray(token_index)
    cache_len = _round_up(prompt_len + max_new_tokens, cache_bucket)
    cache_len = max(cache_len, padded_len)
    scaling = inference_scaling(cfg, prompt_len)
    ntk_alpha, use_logn = scaling["ntk_alpha"], scaling["use_logn"]
    graphdef, state = nnx.split(model)
    cache = init_cache(cfg, bsz, cache_len, model.dtype)
    static = dict(ntk_alpha=ntk_alpha, use_logn=use_logn, do_sample=do_sample, top_k=int(top_k))
    rng = jax.random.key(0) if rng is None else rng
    sampling = (rng, np.float32(temperature), np.float32(top_p))
    chosen, cache = _prefill(
        graphdef, state, ids, seg, images, token_index, cache, prompt_len - 1, *sampling, **static
    )
    seqs = [list(r) for r in rows]
    out: list[list[int]] = [[] for _ in rows]
    done = np.zeros(bsz, bool)
    for step in range(max_new_tokens):
        chosen = np.array(chosen)  # the one host round trip per token
        for b in range(bsz):
            if done[b]:
                chosen[b] = eos_token_id
                continue
            if stop_words_ids and _ends_with(seqs[b], stop_words_ids):
                chosen[b] = eos_token_id
            tok = int(chosen[b])
            seqs[b].append(tok)
            out[b].append(tok)
            done[b] = tok == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        chosen, cache = _decode(
            graphdef,
            state,
            chosen,
            cache,
            np.int32(prompt_len + step),
            np.int32(step + 1),
            *sampling,
            **static,
        )
    return out[0] if single else out
