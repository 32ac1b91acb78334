"""The Resampler: Qwen-VL's position-aware vision-language adapter (`transformer.visual.attn_pool`).

One cross-attention layer: n_queries learned queries attend to the projected ViT patch features,
with 2-D sin-cos position tables added to queries and keys, compressing any number of patches to
n_queries vectors of the LLM width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.model import layers
from qwenvl_jax.model.attention import dot_product_attention
from qwenvl_jax.model.options import ModelOptions


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[pos.size, dim] table [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """The MAE 2-D sin-cos table [grid_size**2, dim] in float32; row index = i * grid_size + j.

    QWEN-QUIRK (of the MAE code): the first dim/2 channels encode the column j and the second
    half the row i, although the original code names them the other way round.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return table.astype(np.float32)


class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention: separate query/key/value inputs, packed q/k/v weights."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        options: ModelOptions,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        head_dim = embed_dim // num_heads
        self.scale = 1.0 / math.sqrt(head_dim)
        self.options = options
        dtype, param_dtype = options.dtype, options.param_dtype
        # Standard [Wq; Wk; Wv] packing: kernel [D, 3, N, H], bias [3, N, H].
        self.in_proj = layers.Einsum(
            "...d,dnh->...nh",  # applied one third at a time (query, key and value inputs differ)
            (embed_dim, 3, num_heads, head_dim),
            ("embed", "qkv", "heads", "head_dim"),
            bias_shape=(3, num_heads, head_dim),
            bias_names=("qkv", "heads", "head_dim"),
            # torch's in_proj_weight [3D, D] keeps xavier_uniform (HF's init only visits Linear).
            kernel_init=layers.uniform(math.sqrt(6.0 / (embed_dim + 3 * embed_dim))),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.out_proj = layers.Einsum(
            "bqnh,nhd->bqd",
            (num_heads, head_dim, embed_dim),
            ("heads", "head_dim", "embed"),
            bias_shape=(embed_dim,),
            bias_names=("embed",),
            kernel_init=layers.normal(init_std),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.dtype = dtype

    def _project(self, x: jax.Array, s: int) -> jax.Array:
        # The packed q/k/v kernel [D, 3, N, H], decoded by its codec when one stores it.
        kernel = self.in_proj.kernel_value()[:, s].astype(self.dtype)
        bias = self.in_proj.bias[s].astype(self.dtype)
        return jnp.einsum("...d,dnh->...nh", x.astype(self.dtype), kernel) + bias

    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        """query [B, Q, D], key and value [B, P, D] -> [B, Q, D]; no mask."""
        q = self._project(query, 0)
        k = self._project(key, 1)
        v = self._project(value, 2)
        out = dot_product_attention(
            q, k, v, causal=False, scale=self.scale, implementation=self.options.attn_impl
        )
        return self.out_proj(out)


class Resampler(nnx.Module):
    """Position-aware vision-language adapter (the paper's term; HF class `Resampler`).

    Attributes:
      query: Param [Q, D], the learned queries.
      pos_embed: Param [Q, D], initialised to the 2-D sin-cos table of the sqrt(Q) grid. The
        reference freezes it but stores it; it is a Param here so fine-tuned checkpoints round-trip.
      kv_proj: [kv_dim, D] without bias (absent when kv_dim == D, as in the reference).
      ln_q, ln_kv: LayerNorms; attn: MultiheadAttention with D / 128 heads in the published model.
    """

    def __init__(
        self,
        grid_size: int,
        embed_dim: int,
        num_heads: int,
        kv_dim: int,
        options: ModelOptions,
        *,
        eps: float,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        self.options = options
        dtype, param_dtype = options.dtype, options.param_dtype
        self.dtype = dtype
        n_queries = grid_size * grid_size
        self.pos_embed = layers.param(
            rngs,
            layers.constant(sincos_2d(embed_dim, grid_size)),
            (n_queries, embed_dim),
            ("queries", "embed"),
            param_dtype,
        )
        self.query = layers.param(
            rngs,
            nnx.initializers.truncated_normal(0.02, lower=-2 / 0.02, upper=2 / 0.02),
            (n_queries, embed_dim),
            ("queries", "embed"),
            param_dtype,
        )
        if kv_dim != embed_dim:
            self.kv_proj = layers.Linear(
                kv_dim,
                embed_dim,
                ("vit_embed", "embed"),
                use_bias=False,
                kernel_init=layers.normal(init_std),
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )
        else:
            self.kv_proj = None
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn = MultiheadAttention(embed_dim, num_heads, options, rngs=rngs, init_std=init_std)
        self.ln_q = layers.LayerNorm(embed_dim, eps=eps, **kw)
        self.ln_kv = layers.LayerNorm(embed_dim, eps=eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ViT output [B, P, kv_dim] (P a square grid) -> [B, Q, D]."""
        pos = self.pos_embed[...]
        k_pos = layers.resize_pos_table(pos, x.shape[1]).astype(self.dtype)
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x)
        q = self.ln_q(self.query[...])
        # QWEN-QUIRK: the queries get the original table, the keys the table resized to the patch
        # grid, the values no position term.
        q = (q + pos.astype(self.dtype))[None]
        q = jnp.broadcast_to(q, (x.shape[0],) + q.shape[1:])
        return self.attn(q, x + k_pos, x)
