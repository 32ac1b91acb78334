"""The serving engine's compiled programs: image encoding, one prefill chunk, one decode step.

All three are module-level `jax.jit`s with the model's graphdef static, so every engine over the
same model shares the compilations. The KV cache is the engine's slot cache ([L, B, S, N, H],
`qwen.init_cache` layout, one row per slot) and is donated: the decode step writes each row's new
k/v in place at that row's own position (`qwen.write_cache`, one scatter per layer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.generate import _scope, warp_logits


def select_tokens(logits, temperature, top_p, seed, step):
    """Per-row next tokens from float32 logits [B, V]: greedy where temperature is 0, else a sample
    from HF's warpers (temperature, top-p) with the row's key `fold_in(key(seed), step)` (as
    `generate`'s per-step key). temperature, top_p: float32 [B]; seed, step: int32 [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        temp = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        warped = warp_logits(logits, temp, 0, top_p[:, None])
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)
        drawn = jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # The sort of the top-p warper over the vocabulary runs only when some row samples.
    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)


@functools.partial(jax.jit, static_argnames=("graphdef", "ctx"))
def encode_images(graphdef, state, pixels, *, ctx=None):
    """float32 pixels [N, S, S, 3] -> adapter outputs [N, Q, D] (the ViT and the resampler)."""
    with _scope(ctx):
        model = nnx.merge(graphdef, state)
        return model.transformer.visual(pixels.astype(model.dtype))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "kv_len", "use_logn", "ctx"), donate_argnames=("cache",)
)
def prefill_chunk(graphdef, state, cache, slot, ids, seg, start, last, features, token_index,
                  sampling, *, kv_len, use_logn, ctx=None):  # fmt: skip
    """One prompt chunk of one slot into the slot cache.

    Args:
      cache: the slot cache (donated). slot: int32, the row. start: int32, the chunk's first slot.
      ids, seg: int32 [1, T] (right-padded to the bucket with segment 0).
      last: int32, the chunk index of the prompt's last token (used on the final chunk).
      features: [1, K, D] adapter outputs of the request's images, or None; token_index: int32
        [1, T] into K (-1 for text), or None.
      sampling: (temperature, top_p, seed) of the row, for its first new token.
      kv_len: static, the cache slots the chunk attends over (>= start + T, a bucket).

    Returns:
      (int32 scalar: the token after position `last`, the cache).
    """
    layers = cache["k"].shape[0]
    with _scope(ctx):
        model = nnx.merge(graphdef, state)
        # This row's first kv_len slots, run as a batch-1 cache, then written back.
        size = (layers, 1, kv_len) + cache["k"].shape[3:]
        row = {
            "k": jax.lax.dynamic_slice(cache["k"], (0, slot, 0, 0, 0), size),
            "v": jax.lax.dynamic_slice(cache["v"], (0, slot, 0, 0, 0), size),
            "segment_ids": jax.lax.dynamic_slice(cache["segment_ids"], (slot, 0), (1, kv_len)),
        }
        hidden, row = model.hidden_states(
            ids,
            segment_ids=seg,
            cache=row,
            cache_index=start,
            image_features=features,
            image_token_index=token_index,
            use_logn=use_logn,
        )
        logits = model.logits(jax.lax.dynamic_index_in_dim(hidden[0], last, keepdims=True))
        temperature, top_p, seed = sampling
        token = select_tokens(logits.astype(jnp.float32), temperature[None], top_p[None],
                              seed[None], jnp.zeros(1, jnp.int32))[0]  # fmt: skip
    cache = {
        "k": jax.lax.dynamic_update_slice(cache["k"], row["k"], (0, slot, 0, 0, 0)),
        "v": jax.lax.dynamic_update_slice(cache["v"], row["v"], (0, slot, 0, 0, 0)),
        "segment_ids": jax.lax.dynamic_update_slice(
            cache["segment_ids"], row["segment_ids"], (slot, 0)
        ),
    }
    return token, cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "kv_len", "use_logn", "ctx"), donate_argnames=("cache",)
)
def decode_step(graphdef, state, cache, tokens, positions, active, sampling, steps, *, kv_len,
                use_logn, ctx=None):  # fmt: skip
    """One new token for each of the first B slots (B <= the cache's rows: a bucket that holds
    every running row, so a lightly loaded engine does not compute its empty slots).

    Args:
      cache: the slot cache (donated; updated in place).
      tokens: int32 [B], each row's last token, written at `positions` [B] (rows that are not
        decoding pass a position past the cache: their write is dropped).
      active: bool [B]. sampling: (temperature, top_p, seed) float32/float32/int32 [B].
      steps: int32 [B], each row's index of the token being chosen (its sampling key).
      kv_len: static bucket >= every active row's position + 1: attention reads only those slots.

    Returns:
      (int32 [B] next tokens, the cache).
    """
    rows = tokens.shape[0]
    with _scope(ctx):
        model = nnx.merge(graphdef, state)
        seg = cache["segment_ids"][:rows, :kv_len]
        view = {"k": cache["k"], "v": cache["v"], "segment_ids": seg}
        hidden, view = model.hidden_states(
            tokens[:, None],
            segment_ids=active.astype(jnp.int32)[:, None],
            cache=view,
            cache_index=positions,
            use_logn=use_logn,
        )
        logits = model.logits(hidden[:, 0]).astype(jnp.float32)
        nxt = select_tokens(logits, *sampling, steps)
    seg = jax.lax.dynamic_update_slice(cache["segment_ids"], view["segment_ids"], (0, 0))
    return nxt, {"k": view["k"], "v": view["v"], "segment_ids": seg}


@functools.partial(jax.jit, static_argnames=("size",))
def read_block(cache, slot, start, *, size):
    """The keys and values [L, 1, size, N, H] of slot `slot` from position `start` (int32s): a
    prefilled prompt block to keep in the engine's prefix cache."""
    shape = (cache["k"].shape[0], 1, size) + cache["k"].shape[3:]
    at = (0, slot, start, 0, 0)
    k = jax.lax.dynamic_slice(cache["k"], at, shape)
    return k, jax.lax.dynamic_slice(cache["v"], at, shape)


@functools.partial(jax.jit, donate_argnames=("cache",))
def write_block(cache, slot, start, k, v):
    """A kept block k, v [L, 1, T, N, H] into slot `slot` at positions start..start+T-1 (segment 1),
    in place: the slot then holds that prompt prefix as if it had been prefilled."""
    at = (0, slot, start, 0, 0)
    seg = jnp.ones((1, k.shape[2]), jnp.int32)
    return {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at),
        "segment_ids": jax.lax.dynamic_update_slice(cache["segment_ids"], seg, (slot, start)),
    }
