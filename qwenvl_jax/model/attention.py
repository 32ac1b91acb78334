"""The one attention function every attention module calls (ViT, Resampler, decoder).

Swapping in a fused kernel (cuDNN flash attention through `jax.nn.dot_product_attention`, or a TPU
splash kernel) only touches this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "jax")


def attention_mask(
    t: int,
    s: int,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array | None:
    """Boolean mask [B or 1, 1, T, S] (True = attend), or None when nothing is masked.

    Causality compares indices in the key sequence: key j is visible to query i when
    `kv_positions[j] <= q_positions[i]` (defaults: `arange(T) + S - T` and `arange(S)`, i.e. the
    queries are the last T keys). Segments: key j is visible when its segment id equals the query's.
    """
    mask = None
    if causal:
        if q_positions is None:
            q_positions = jnp.arange(t, dtype=jnp.int32)[None] + (s - t)
        if kv_positions is None:
            kv_positions = jnp.arange(s, dtype=jnp.int32)[None]
        mask = kv_positions[:, None, None, :] <= q_positions[:, None, :, None]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        seg = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = seg if mask is None else mask & seg
    return mask


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    scale: float,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention `softmax(scale * q k^T + mask) v`, softmax in float32.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, N, H] keys.
      v: [B, S, N, H] values.
      causal: mask keys after the query (by index in the key sequence, see `attention_mask`).
      scale: multiplies the scores (1/sqrt(H) everywhere in Qwen-VL).
      q_segment_ids: int [B, T]; with kv_segment_ids [B, S], attention stays within equal ids
        (packed samples; 0 = padding, which then only sees padding).
      q_positions: int [B, T] index of each query in the key sequence (cached decoding: the cache
        slot it was written to). Default: the last T keys.
      kv_positions: int [B, S] index of each key. Default `arange(S)`.
      implementation: "xla" (the reference math), "cudnn" or "jax" (`jax.nn.dot_product_attention`
        with that implementation; "jax" is XLA's version of the same call, "cudnn" is GPU only).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: not in {IMPLEMENTATIONS}")
    b, t, n, h = q.shape
    s = k.shape[1]
    if k.shape != (k.shape[0], s, n, h) or v.shape != k.shape:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    mask = attention_mask(
        t,
        s,
        causal=causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
    )
    if implementation != "xla":
        if mask is not None:
            mask = jnp.broadcast_to(mask, (b, 1, t, s))
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            scale=scale,
            implementation=None if implementation == "jax" else implementation,
        )
    scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * scale
    if mask is not None:
        # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)
