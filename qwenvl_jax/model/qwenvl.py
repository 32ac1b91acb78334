"""Qwen-VL: the visual tower's features spliced into the Qwen decoder's token stream.

Public:
  QWenLMHeadModel(config, options, *, rngs)      options: a `ModelOptions`, passed whole down
  model(input_ids, *, images, image_token_index, segment_ids, positions, cache, cache_index,
        ntk_alpha, use_logn, image_valid, image_budget, image_groups)
    -> logits [B, T, V]  (or (logits, cache) when a cache is passed)
  model.hidden_states(input_ids, ...same keywords) -> [B, T, D] after ln_f (or (hidden, cache))
  model.logits(hidden) -> [..., V]                 the LM head alone (the chunked training loss)
The `image_token_index` of token ids comes from `qwenvl_jax.tokenizer.image_token_index`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import QWenConfig
from qwenvl_jax.model import layers
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwen import QWenBlock, rotary_inv_freq
from qwenvl_jax.model.visual import VisionTransformer


def splice_features(embeds: jax.Array, features: jax.Array, token_index: jax.Array) -> jax.Array:
    """Replace embeddings where token_index >= 0 with the indexed feature row (gather + where).

    Args:
      embeds: [B, T, D] token embeddings.
      features: [B, K, D] per-row image features (K = M * n_queries).
      token_index: int [B, T], index into K, -1 for text. Indices >= K are clipped (callers check
        that every span has an image: `generate` and `QwenVL` compare span counts with M).

    Returns:
      [B, T, D] in embeds' dtype.
    """
    gathered = jnp.take_along_axis(
        features, jnp.clip(token_index, 0, features.shape[1] - 1)[..., None], axis=1
    )
    return jnp.where(token_index[..., None] >= 0, gathered.astype(embeds.dtype), embeds)


def _cache_positions(cache_index: jax.Array, batch: int, t: int) -> jax.Array:
    """int32 [B, T] rotary positions of T tokens written at cache_index (scalar or [B])."""
    start = cache_index[:, None] if cache_index.ndim == 1 else cache_index
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (batch, t))


def _write_segments(kv_seg: jax.Array, segment_ids: jax.Array, cache_index: jax.Array):
    """The cache's segment ids [B, S] with the T new tokens' ids written at cache_index."""
    segment_ids = segment_ids.astype(jnp.int32)
    if cache_index.ndim == 0:
        return jax.lax.dynamic_update_slice(kv_seg, segment_ids, (0, cache_index))
    b, t = segment_ids.shape
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    return kv_seg.at[rows, _cache_positions(cache_index, b, t)].set(segment_ids, mode="drop")


class QWenModel(nnx.Module):
    """`transformer`: wte, the decoder blocks `h`, ln_f and the visual tower `visual`."""

    def __init__(self, cfg: QWenConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.options = options
        self.dtype = options.dtype
        kw = dict(rngs=rngs, dtype=options.dtype, param_dtype=options.param_dtype)
        self.wte = layers.Embed(
            cfg.vocab_size, cfg.hidden_size, init_std=cfg.initializer_range, **kw
        )

        def make(r):
            return QWenBlock(cfg, options, rngs=r)

        if options.scan_layers:
            self.h = layers.make_stacked(make, cfg.num_hidden_layers, rngs)
        else:
            self.h = nnx.List([make(rngs) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = layers.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, **kw)
        self.visual = VisionTransformer(
            cfg.visual,
            options,
            rngs=rngs,
            init_std=cfg.initializer_range,
            c_proj_std=layers.c_proj_std(cfg.initializer_range, cfg.num_hidden_layers),
        )

    def encode_images(
        self,
        images: jax.Array,
        image_valid: jax.Array | None = None,
        image_budget: int | None = None,
        image_groups: int = 1,
    ) -> jax.Array:
        """images [B, M, S, S, 3] -> features [B, M * n_queries, D].

        Without a budget every slot is encoded (one visual call over B*M images). With
        `image_budget` K and `image_valid` [B, M], the rows are split into `image_groups` G equal
        blocks (one per data-parallel shard, so the gathers stay on the shard) and only the first
        K valid slots of each block are encoded: the ViT and adapter run on [G*K] images instead
        of [B*M], and the features go back to their slots by a gather. Slots past the budget and
        empty slots get zero features; `image_token_index` never points at an empty slot, and the
        trainer refuses a batch whose block holds more than K images (`train.step.check_budget`).
        """
        if images.ndim != 5:
            raise ValueError(f"images must be [B, M, S, S, 3], got shape {images.shape}")
        b, m = images.shape[:2]
        pix_shape = images.shape[2:]
        if image_budget is None or image_valid is None:
            feats = self.visual(images.reshape((b * m,) + pix_shape))
            return feats.reshape(b, m * feats.shape[1], feats.shape[2])
        g = int(image_groups)
        if b % g or int(image_budget) < 1:
            raise ValueError(f"{b} rows do not split into {g} image groups, or budget < 1")
        slots = (b // g) * m
        k = min(int(image_budget), slots)
        valid = image_valid.reshape(g, slots).astype(bool)
        # The valid slots first, in slot order (a stable sort of the 0/1 "empty" key).
        order = jnp.argsort(jnp.logical_not(valid).astype(jnp.int32), axis=1, stable=True)[:, :k]
        picked = jnp.take_along_axis(
            images.reshape((g, slots) + pix_shape), order[:, :, None, None, None], axis=1
        )  # [G, K, S, S, 3]
        picked = layers.shard_activation(picked, ("act_batch", None, None, None, None))
        feats = self.visual(picked.reshape((g * k,) + pix_shape))  # [G*K, Q, D]
        q, d = feats.shape[1:]
        feats = layers.shard_activation(feats.reshape(g, k, q, d), ("act_batch", None, None, None))
        rank = jnp.cumsum(valid, axis=1) - 1  # a valid slot's index among its block's encoded
        back = jnp.take_along_axis(feats, jnp.clip(rank, 0, k - 1)[:, :, None, None], axis=1)
        back = jnp.where((valid & (rank < k))[:, :, None, None], back, jnp.zeros((), back.dtype))
        return back.reshape(b, m * q, d)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        images: jax.Array | None = None,
        image_token_index: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
        ntk_alpha: float | jax.Array = 1.0,
        use_logn: bool = False,
        image_valid: jax.Array | None = None,
        image_budget: int | None = None,
        image_groups: int = 1,
        image_features: jax.Array | None = None,
    ):
        """Final hidden states [B, T, D] after ln_f (and the new cache when one is given).

        `image_features` [B, K, D]: adapter outputs encoded beforehand (`encode_images`), spliced
        by `image_token_index` instead of encoding `images` (the serving engine's feature cache).
        """
        cfg = self.cfg
        bsz, t = input_ids.shape
        x = self.wte(input_ids)
        if images is not None:
            if image_token_index is None:
                raise ValueError("images given without image_token_index")
            if image_token_index.shape != input_ids.shape:
                raise ValueError(
                    f"image_token_index shape {image_token_index.shape} != input_ids shape "
                    f"{input_ids.shape}"
                )
            if images.shape[0] != bsz:
                raise ValueError(f"images batch {images.shape[0]} != input_ids batch {bsz}")
            feats = self.encode_images(images, image_valid, image_budget, image_groups)
            x = splice_features(x, feats, image_token_index)
        elif image_features is not None:
            x = splice_features(x, image_features, image_token_index)
        x = layers.shard_activation(x, ("act_batch", "act_seq", "act_embed"))

        if cache is not None:
            if cache_index is None:
                raise ValueError("a cache needs cache_index (where the new tokens are written)")
            cache_index = jnp.asarray(cache_index, jnp.int32)
            if segment_ids is None:
                segment_ids = jnp.ones((bsz, t), jnp.int32)
            if positions is None:
                positions = _cache_positions(cache_index, bsz, t)
            kv_seg = _write_segments(cache["segment_ids"], segment_ids, cache_index)
            # The stacked k/v ride in the layer loop's carry; the per-layer input is the layer
            # index, so each layer updates the one buffer in place (qwen.write_cache).
            carry = (x, cache["k"], cache["v"])
            xs = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        else:
            kv_seg = None
            carry, xs = x, None
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)[None]
        positions = jnp.broadcast_to(positions, (bsz, t))
        inv_freq = rotary_inv_freq(cfg.head_dim, cfg.rotary_emb_base, ntk_alpha)

        def call(block, c, layer):
            if layer is None:
                return block(c, positions=positions, segment_ids=segment_ids, inv_freq=inv_freq,
                             use_logn=use_logn)  # fmt: skip
            h, k_all, v_all = c
            h, (k_all, v_all) = block(
                h,
                positions=positions,
                segment_ids=segment_ids,
                inv_freq=inv_freq,
                use_logn=use_logn,
                layer_cache=(k_all, v_all, kv_seg, layer),
                cache_index=cache_index,
            )
            return (h, k_all, v_all), None

        out, _ = layers.run_stack(
            self.h, carry, xs, scan=self.options.scan_layers, remat=self.options.remat, call=call
        )
        if cache is None:
            return self.ln_f(out)
        x, k_all, v_all = out
        return self.ln_f(x), {"k": k_all, "v": v_all, "segment_ids": kv_seg}


class QWenLMHeadModel(nnx.Module):
    """Qwen-VL: `transformer` (QWenModel with its visual tower) and the untied `lm_head`.

    Args (constructor):
      config: a QWenConfig (e.g. `get_preset("tiny")`): the architecture, what the checkpoint
        holds.
      options: a `ModelOptions` (dtypes, scan_layers, remat, attn_impl): how it is stored and
        computed. The one object reaches every decoder block, the ViT and the adapter (each
        keeps it as `.options`).
      rngs: nnx.Rngs for initialisation.
    """

    def __init__(self, config: QWenConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        self.config = config
        self.options = options
        self.dtype = options.dtype
        self.transformer = QWenModel(config, options, rngs=rngs)
        self.lm_head = layers.Linear(
            config.hidden_size,
            config.vocab_size,
            ("embed", "vocab"),
            use_bias=False,
            kernel_init=layers.normal(config.initializer_range),
            rngs=rngs,
            dtype=options.dtype,
            param_dtype=options.param_dtype,
        )

    def hidden_states(self, input_ids: jax.Array, **kwargs):
        """The final hidden states [B, T, D] after ln_f, in the compute dtype (and the new cache
        when a cache is passed): the forward without the LM head.

        Takes the keywords of `__call__`. The training loss applies `logits` to chunks of these,
        so the [B, T, V] float32 logits never exist in full.
        """
        return self.transformer(input_ids, **kwargs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head: hidden [..., D] -> logits [..., V] in the compute dtype."""
        return self.lm_head(hidden)

    def __call__(self, input_ids: jax.Array, *, cache: dict | None = None, **inputs):
        """Logits of the next token at every position.

        The keywords are `QWenModel.__call__`'s (typed there, written once):

        Args:
          input_ids: int32 [B, T].
          images: float32 [B, M, S, S, 3] CLIP-normalised NHWC, or None (text only).
          image_token_index: int32 [B, T], `m * n_queries + q` inside image spans, -1 elsewhere
            (see `image_token_index`); required with images.
          segment_ids: int32 [B, T], 0 = padding, 1.. = packed samples (attention stays inside).
          positions: int32 [B, T] rotary positions; default arange(T) (cache_index + arange(T)
            with a cache).
          cache: a KV cache from `qwen.init_cache`; the T tokens are written at cache_index.
          cache_index: int32 scalar, the first cache slot of these tokens.
          ntk_alpha: dynamic-NTK alpha (inference: `qwen.dynamic_ntk_alpha(prompt_len, 2048)`,
            computed at prefill and reused while decoding); 1.0 = off (training).
          use_logn: logn query scaling by absolute position (inference only; identity <= 2048).
          image_valid: bool [B, M], the slot holds a picture; with `image_budget` K (static) only
            the first K valid slots of each of `image_groups` row blocks are encoded
            (`QWenModel.encode_images`); without a budget every slot is.

        Returns:
          logits [B, T, V] in the compute dtype, or (logits, new_cache) when cache is given.
        """
        out = self.hidden_states(input_ids, cache=cache, **inputs)
        if cache is None:
            return layers.shard_activation(self.logits(out), ("act_batch", "act_seq", "act_vocab"))
        h, new_cache = out
        return self.logits(h), new_cache
