"""Qwen-VL's vision encoder: ViT-bigG (no class token) followed by the Resampler adapter.

Attribute paths equal the HF keys under `transformer.visual.` (docs/architecture.md).
Images are NHWC float [B, S, S, 3], CLIP-normalised.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import VisualConfig
from qwenvl_jax.model import layers
from qwenvl_jax.model.attention import dot_product_attention
from qwenvl_jax.model.layers import bicubic_matrix, pos_resize_matrix, resize_pos_table
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.resampler import Resampler

__all__ = ["VisionTransformer", "bicubic_matrix", "pos_resize_matrix", "resize_pos_table"]


class VisualAttention(nnx.Module):
    """ViT self-attention with a fused, per-head interleaved q/k/v projection."""

    def __init__(
        self,
        width: int,
        heads: int,
        options: ModelOptions,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        head_dim = width // heads
        self.scale = 1.0 / math.sqrt(head_dim)
        self.options = options
        dtype, param_dtype = options.dtype, options.param_dtype
        # QWEN-QUIRK: the fused in_proj rows are interleaved per head (head, {q,k,v}, dim), not the
        # [Wq; Wk; Wv] layout of nn.MultiheadAttention; kernel [W, N, 3, H] keeps that order.
        self.in_proj = layers.Einsum(
            "bpw,wnsh->bpnsh",
            (width, heads, 3, head_dim),
            ("vit_embed", "vit_heads", "qkv", "head_dim"),
            bias_shape=(heads, 3, head_dim),
            bias_names=("vit_heads", "qkv", "head_dim"),
            kernel_init=layers.normal(init_std),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.out_proj = layers.Einsum(
            "bpnh,nhw->bpw",
            (heads, head_dim, width),
            ("vit_heads", "head_dim", "vit_embed"),
            bias_shape=(width,),
            bias_names=("vit_embed",),
            kernel_init=layers.normal(init_std),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        qkv = layers.remat_name(self.in_proj(x), "qkv_proj")  # [B, P, N, 3, H]
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        out = dot_product_attention(
            q, k, v, causal=False, scale=self.scale, implementation=self.options.attn_impl
        )
        return self.out_proj(layers.remat_name(out, "attn_out"))


class VisualMLP(nnx.Module):
    """c_fc -> exact (erf) GELU -> c_proj, both with bias."""

    def __init__(
        self,
        width: int,
        mlp_width: int,
        options: ModelOptions,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        c_proj_std: float = 0.02,
    ):
        kw = dict(use_bias=True, rngs=rngs, dtype=options.dtype, param_dtype=options.param_dtype)
        fc_init, proj_init = layers.normal(init_std), layers.normal(c_proj_std)
        self.c_fc = layers.Linear(
            width, mlp_width, ("vit_embed", "vit_mlp"), kernel_init=fc_init, **kw
        )
        self.c_proj = layers.Linear(
            mlp_width, width, ("vit_mlp", "vit_embed"), kernel_init=proj_init, **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.remat_name(jax.nn.gelu(self.c_fc(x), approximate=False), "mlp_hidden")
        h = layers.shard_activation(h, ("act_batch", "act_seq", "act_mlp"))
        return self.c_proj(h)


class VisualAttentionBlock(nnx.Module):
    """Pre-norm ViT block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). No mask, no layer scale."""

    def __init__(
        self,
        cfg: VisualConfig,
        options: ModelOptions,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        c_proj_std: float = 0.02,
    ):
        self.options = options
        kw = dict(rngs=rngs, dtype=options.dtype, param_dtype=options.param_dtype)
        eps = cfg.layer_norm_epsilon
        self.ln_1 = layers.LayerNorm(cfg.width, eps=eps, **kw)
        self.attn = VisualAttention(cfg.width, cfg.heads, options, rngs=rngs, init_std=init_std)
        self.ln_2 = layers.LayerNorm(cfg.width, eps=eps, **kw)
        self.mlp = VisualMLP(
            cfg.width, cfg.mlp_width, options, rngs=rngs, init_std=init_std, c_proj_std=c_proj_std
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return layers.shard_activation(x, ("act_batch", "act_seq", "act_embed"))


class TransformerBlock(nnx.Module):
    """The ViT trunk; `resblocks` is an nnx.List, or one stacked module when scan_layers."""

    def __init__(
        self,
        cfg: VisualConfig,
        options: ModelOptions,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        c_proj_std: float = 0.02,
    ):
        self.options = options

        def make(r):
            return VisualAttentionBlock(
                cfg, options, rngs=r, init_std=init_std, c_proj_std=c_proj_std
            )

        if options.scan_layers:
            self.resblocks = layers.make_stacked(make, cfg.layers, rngs)
        else:
            self.resblocks = nnx.List([make(rngs) for _ in range(cfg.layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x, _ = layers.run_stack(
            self.resblocks,
            x,
            scan=self.options.scan_layers,
            remat=self.options.vit_remat,
            call=lambda block, h, _: (block(h), None),
        )
        return x


class VisionTransformer(nnx.Module):
    """ViT-bigG/14 without class token, then `attn_pool` (Resampler), `ln_post` and `x @ proj`.

    Args (constructor):
      cfg: the visual config.
      options: the model's `ModelOptions`, passed whole to the blocks and the adapter: dtypes,
        `scan_layers` (stacked blocks run with `jax.lax.scan`), `vit_remat` (per block) and
        `attn_impl`.
      init_std / c_proj_std: the normal init of the Linear layers / of the MLP's c_proj: the
        published code's `initializer_range` and `initializer_range / sqrt(2 L_llm)` (HF's
        `_init_weights` reaches the visual tower too). conv1 keeps PyTorch's Conv2d default
        U(+-1/sqrt(fan_in)); `positional_embedding` and `proj` their own width^-0.5 randn.
    """

    def __init__(
        self,
        cfg: VisualConfig,
        options: ModelOptions,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        c_proj_std: float = 0.02,
    ):
        self.cfg = cfg
        self.options = options
        self.dtype = dtype = options.dtype
        param_dtype = options.param_dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        p, w = cfg.patch_size, cfg.width
        self.conv1 = layers.Einsum(
            "bghijc,ijcw->bghw",
            (p, p, 3, w),
            ("patch", "patch", "channels", "vit_embed"),
            kernel_init=layers.uniform(1.0 / math.sqrt(p * p * 3)),
            **kw,
        )
        self.positional_embedding = layers.param(
            rngs,
            layers.normal(w**-0.5),
            (cfg.pos_grid_size**2, w),
            ("queries", "vit_embed"),
            param_dtype,
        )
        self.ln_pre = layers.LayerNorm(w, eps=cfg.layer_norm_epsilon, **kw)
        self.transformer = TransformerBlock(
            cfg, options, rngs=rngs, init_std=init_std, c_proj_std=c_proj_std
        )
        self.attn_pool = Resampler(
            grid_size=math.isqrt(cfg.n_queries),
            embed_dim=cfg.output_dim,
            num_heads=cfg.resampler_heads,
            kv_dim=w,
            options=options,
            eps=cfg.layer_norm_epsilon,
            rngs=rngs,
            init_std=init_std,
        )
        self.ln_post = layers.LayerNorm(cfg.output_dim, eps=cfg.layer_norm_epsilon, **kw)
        # QWEN-QUIRK: proj is a raw [in, out] matrix applied as x @ proj (no transpose, no bias).
        self.proj = layers.param(
            rngs,
            layers.normal(cfg.output_dim**-0.5),
            (cfg.output_dim, cfg.output_dim),
            ("embed", None),
            param_dtype,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """Encode images.

        Args:
          images: float [B, S, S, 3], NHWC, CLIP-normalised; S = cfg.image_size.

        Returns:
          [B, n_queries, output_dim] features in the compute dtype.
        """
        cfg = self.cfg
        b, s1, s2, c = images.shape
        if (s1, s2, c) != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"images have shape {images.shape}; expected [B, {cfg.image_size}, "
                f"{cfg.image_size}, 3] (NHWC)"
            )
        g, p = cfg.grid_size, cfg.patch_size
        # Pixels are cast to the compute dtype before the patch embedding, as in the reference.
        x = images.astype(self.dtype).reshape(b, g, p, g, p, 3)
        x = self.conv1(x.transpose(0, 1, 3, 2, 4, 5))  # stride = kernel: a per-patch linear map
        x = x.reshape(b, g * g, cfg.width)  # token = row * g + col
        x = x + resize_pos_table(self.positional_embedding[...], g * g).astype(self.dtype)
        x = self.ln_pre(x)
        x = layers.shard_activation(x, ("act_batch", "act_seq", "act_embed"))
        x = self.transformer(x)
        x = self.attn_pool(x)
        x = self.ln_post(x)
        return jnp.einsum("bqd,de->bqe", x, self.proj[...].astype(self.dtype))
