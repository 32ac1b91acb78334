"""The Qwen decoder block: fused-qkv attention with rotary, dynamic NTK, logn; SwiGLU; RMSNorm.

KV cache layout (cached decoding, see `init_cache`): a dict with `k` and `v` [L, B, N, S, H]
holding the post-rotary keys and values of every layer, heads before positions (the layout the
attention's batched products read directly, `attention.cached_attention`), and `segment_ids`
[B, S] (0 = empty slot or padding).

The stacked k/v travel whole through the layer loop (never sliced into per-layer inputs and
re-stacked): each layer writes its new keys and values with one `dynamic_update_slice` (or, with a
per-row `cache_index`, one scatter) at its own layer index, so inside a compiled decode loop XLA
updates the cache buffer in place and no step copies it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import QWenConfig
from qwenvl_jax.model import layers
from qwenvl_jax.model.attention import cached_attention, dot_product_attention
from qwenvl_jax.model.options import ModelOptions

# The reference precomputes logn factors for positions 1..32767 only.
LOGN_TABLE_SIZE = 32767


# ----------------------------------------------------------------------------- NTK, rotary, logn
def dynamic_ntk_alpha(kv_len: int, seq_length: int) -> float:
    """The reference's inference-time NTK alpha for a prefill of kv_len tokens (1 up to seq_length).

    context = log2(kv_len / seq_length) + 1; alpha = max(2**ceil(context) - 1, 1).
    """
    if kv_len <= 0:
        raise ValueError(f"kv_len must be positive, got {kv_len}")
    context_value = math.log(kv_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def inference_scaling(cfg: QWenConfig, kv_len: int) -> dict:
    """The forward's `ntk_alpha` / `use_logn` for inference over a prompt of kv_len tokens.

    As the reference in eval mode: alpha from the prompt length when `use_dynamic_ntk` (computed
    once at prefill and reused for every decode step), logn when `use_logn_attn`. Training passes
    neither (alpha 1, no logn).
    """
    alpha = dynamic_ntk_alpha(kv_len, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
    return {"ntk_alpha": alpha, "use_logn": bool(cfg.use_logn_attn)}


def rotary_inv_freq(head_dim: int, base: float, ntk_alpha: float | jax.Array = 1.0) -> jax.Array:
    """Float32 [H/2] inverse frequencies of Qwen's rotary with NTK-scaled base.

    base' = base * alpha ** (H / (H - 2)); inv_freq_k = 1 / base' ** (2k / H). A Python alpha is
    combined with the base in float64 and rounded once to float32, as PyTorch does with a Python
    scalar; an array alpha is combined in float32.
    """
    if isinstance(ntk_alpha, int | float):
        scaled = jnp.float32(base * float(ntk_alpha) ** (head_dim / (head_dim - 2)))
    else:
        scaled = jnp.float32(base) * jnp.asarray(ntk_alpha, jnp.float32) ** (
            head_dim / (head_dim - 2)
        )
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / jnp.float32(head_dim)
    return 1.0 / (scaled**exponents)


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Half-rotation (GPT-NeoX style) rotary over all head dims, in float32.

    Args:
      x: [B, T, N, H]; positions: int [B, T]; inv_freq: float32 [H/2].

    Returns:
      x rotated, in x's dtype: x*cos + rotate_half(x)*sin with rotate_half = concat(-x2, x1).
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def logn_table(seq_length: int) -> np.ndarray:
    """Float32 [32767] logn factors by 0-based position p: log(p+1)/log(seq_length), 1 up to it."""
    i = np.arange(1, LOGN_TABLE_SIZE + 1, dtype=np.float64)
    table = np.where(i > seq_length, np.log(i) / np.log(seq_length), 1.0)
    return table.astype(np.float32)


def logn_scale(positions: jax.Array, seq_length: int) -> jax.Array:
    """Float32 [B, T] logn factors for 0-based absolute positions (1 up to seq_length)."""
    table = jnp.asarray(logn_table(seq_length))
    return table[jnp.clip(positions, 0, LOGN_TABLE_SIZE - 1)]


# ----------------------------------------------------------------------------- modules
class QWenAttention(nnx.Module):
    """Causal self-attention: fused c_attn (with bias), rotary, [logn], attention, c_proj."""

    def __init__(self, cfg: QWenConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.seq_length = cfg.seq_length
        self.head_dim = h
        self.options = options
        dtype, param_dtype = options.dtype, options.param_dtype
        std = cfg.initializer_range
        # [Wq; Wk; Wv], each head-major: kernel [D, 3, N, H]. c_attn has a bias even with no_bias.
        self.c_attn = layers.Einsum(
            "btd,dsnh->btsnh",
            (d, 3, n, h),
            ("embed", "qkv", "heads", "head_dim"),
            bias_shape=(3, n, h),
            bias_names=("qkv", "heads", "head_dim"),
            kernel_init=layers.normal(std),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.c_proj = layers.Einsum(
            "btnh,nhd->btd",
            (n, h, d),
            ("heads", "head_dim", "embed"),
            bias_shape=None if cfg.no_bias else (d,),
            bias_names=("embed",),
            kernel_init=layers.normal(layers.c_proj_std(std, cfg.num_hidden_layers)),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        inv_freq: jax.Array,
        use_logn: bool,
        layer_cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ):
        """x [B, T, D] -> ([B, T, D], the new stacked (k, v) [L, B', N, S, H] or None).

        layer_cache: (k, v, kv_segment_ids, layer): the whole stacked cache (B' >= B rows; the
        tokens are those of its first B), the key segment ids [B, S'] and this layer's int32
        index. The T new keys/values are written at slot cache_index (an int32 scalar, or int32
        [B] per row) of layer `layer`; the queries attend to the first S' <= S slots (those <=
        their own position).
        """
        qkv = layers.remat_name(self.c_attn(x), "qkv_proj")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H]
        q = apply_rotary(q, positions, inv_freq)
        k = apply_rotary(k, positions, inv_freq)
        if use_logn:
            # Inference only: scale queries past seq_length by log(p+1)/log(seq_length).
            q = q * logn_scale(positions, self.seq_length).astype(q.dtype)[:, :, None, None]
        q = layers.shard_activation(q, ("act_batch", "act_seq", "act_heads", None))
        new_cache = None
        if layer_cache is None:
            out = dot_product_attention(
                q,
                k,
                v,
                causal=True,
                scale=1.0 / math.sqrt(self.head_dim),
                q_segment_ids=segment_ids,
                kv_segment_ids=segment_ids,
                implementation=self.options.attn_impl,
            )
        else:
            k_all, v_all, kv_seg, layer = layer_cache
            t, s = x.shape[1], kv_seg.shape[1]
            k_all, v_all = write_cache(k_all, v_all, k, v, layer, cache_index)
            q_pos = _positions(cache_index, x.shape[0], t)
            kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (x.shape[0], s))
            # This layer's first s slots of the first B rows (the serving engine runs its first
            # rows only): a read, fused into the attention where XLA can.
            n, h = k_all.shape[2], k_all.shape[4]
            shape = (1, x.shape[0], n, s, h)
            start = (layer, 0, 0, 0, 0)
            ck = jax.lax.dynamic_slice(k_all, start, shape)[0]
            cv = jax.lax.dynamic_slice(v_all, start, shape)[0]
            out = cached_attention(
                q,
                ck.astype(q.dtype),
                cv.astype(q.dtype),
                scale=1.0 / math.sqrt(self.head_dim),
                q_segment_ids=segment_ids,
                kv_segment_ids=kv_seg,
                q_positions=q_pos,
                kv_positions=kv_pos,
            )
            new_cache = (k_all, v_all)
        return self.c_proj(layers.remat_name(out, "attn_out")), new_cache


def _positions(cache_index: jax.Array, batch: int, t: int) -> jax.Array:
    """int32 [B, T]: the cache slots of T new tokens written at cache_index (scalar or [B])."""
    start = jnp.asarray(cache_index, jnp.int32)
    start = start[:, None] if start.ndim == 1 else start
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (batch, t))


def write_cache(k_all, v_all, k, v, layer, cache_index):
    """Write k, v [B, T, N, H] into the stacked caches [L, B, N, S, H] at layer `layer`.

    A scalar cache_index writes every row at the same slots with one dynamic_update_slice; an
    int32 [B] cache_index writes row b at slots cache_index[b] + arange(T) with one scatter (rows
    at different lengths: the serving engine's slots). Both update the buffer in place when it is
    a loop carry or donated.
    """
    idx = jnp.asarray(cache_index, jnp.int32)
    if idx.ndim == 0:
        at = (layer, 0, 0, idx, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, _heads_major(k, k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, _heads_major(v, v_all.dtype), at)
        return k_all, v_all
    b, t = k.shape[:2]
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    slots = _positions(idx, b, t)
    # Advanced indices on either side of the heads' slice: the indexed view is [B, T, N, H].
    k_all = k_all.at[layer, rows, :, slots].set(k.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[layer, rows, :, slots].set(v.astype(v_all.dtype), mode="drop")
    return k_all, v_all


def _heads_major(x: jax.Array, dtype) -> jax.Array:
    """[B, T, N, H] -> [1, B, N, T, H] in dtype: new keys or values as a block of the cache."""
    return jnp.swapaxes(x, 1, 2)[None].astype(dtype)


class QWenMLP(nnx.Module):
    """SwiGLU: c_proj(w1(x) * silu(w2(x)))."""

    def __init__(self, cfg: QWenConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.mlp_width
        kw = dict(
            use_bias=not cfg.no_bias,
            rngs=rngs,
            dtype=options.dtype,
            param_dtype=options.param_dtype,
        )
        std = cfg.initializer_range
        self.w1 = layers.Linear(d, f, ("embed", "mlp"), kernel_init=layers.normal(std), **kw)
        self.w2 = layers.Linear(d, f, ("embed", "mlp"), kernel_init=layers.normal(std), **kw)
        out_std = layers.c_proj_std(std, cfg.num_hidden_layers)
        self.c_proj = layers.Linear(
            f, d, ("mlp", "embed"), kernel_init=layers.normal(out_std), **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # QWEN-QUIRK: w2 is the gate (through SiLU) and w1 the up projection.
        h = layers.remat_name(self.w1(x) * jax.nn.silu(self.w2(x)), "mlp_hidden")
        h = layers.shard_activation(h, ("act_batch", "act_seq", "act_mlp"))
        return self.c_proj(h)


class QWenBlock(nnx.Module):
    """Pre-norm decoder block: h + attn(ln_1(h)), then h + mlp(ln_2(h))."""

    def __init__(self, cfg: QWenConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        self.options = options
        kw = dict(rngs=rngs, dtype=options.dtype, param_dtype=options.param_dtype)
        self.ln_1 = layers.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, **kw)
        self.attn = QWenAttention(cfg, options, rngs=rngs)
        self.ln_2 = layers.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, **kw)
        self.mlp = QWenMLP(cfg, options, rngs=rngs)

    def __call__(self, x: jax.Array, **attn_kwargs):
        a, new_cache = self.attn(self.ln_1(x), **attn_kwargs)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return layers.shard_activation(x, ("act_batch", "act_seq", "act_embed")), new_cache


def init_cache(cfg: QWenConfig, batch: int, max_length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for `max_length` positions.

    Returns:
      {"k", "v": zeros [L, B, N, S, H] in dtype, "segment_ids": int32 zeros [B, S]}.
    """
    shape = (cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_length, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_length), jnp.int32),
    }
