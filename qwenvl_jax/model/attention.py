"""The one attention function every attention module calls (ViT, Resampler, decoder).

`implementation="auto"` (the default) picks a fused kernel for the platform the computation is
compiled for (the active mesh's devices, else the default backend), per use:

- TPU: Pallas splash attention for all three (decoder: segment ids, block-sparse causal mask;
  ViT and adapter: full mask), per device under a shard_map over batch and heads.
- GPU: the Pallas Triton flash kernel (`pallas.ops.gpu.attention.mha`) for the packed causal
  decoder (segment ids and causality inside the kernel, no mask array); cuDNN flash attention
  (`jax.nn.dot_product_attention`) for the ViT (head dim 104) and the adapter's cross-attention.
- CPU: XLA; causal self-attention by blocks of queries, the blocks above the diagonal skipped.

Why these: splash is the TPU flash kernel that takes segment ids and block-sparse masks (MaxText's
default). On GPU, cuDNN is the fastest flash kernel JAX exposes (docs/performance.md: 1.67 ms vs
XLA 8.1 ms causal, 1.61 vs 3.83 ms on ViT shapes, head dim 104 accepted), but JAX 0.10.2's
`jax.nn.dot_product_attention` takes no segment ids (only one valid length per row), so packed rows
would need a dense [B, T, T] mask; the Triton flash kernel takes segment ids directly. Which of the
two is faster on packed 2048-token rows on an H200 is still to be measured (`python -m
qwenvl_jax.bench --attn_impl=auto,cudnn`); `cudnn` stays selectable (causal through `is_causal`,
segments as a mask). `tokamax` (`pip install tokamax`, the gpu extra) is the third choice for
packed rows: tokamax's flash attention (Mosaic GPU on Hopper) with each query's first key
(`packed_k_start`) in place of a mask, so key blocks of earlier samples are skipped; `python -m
qwenvl_jax.bench --suite=device` times it against `auto` and `cudnn`. Shapes a kernel cannot
tile (sequence lengths not a multiple of 128 for splash, cached decoding with explicit positions)
fall back to XLA, the reference math.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "jax", "splash", "pallas_gpu", "tokamax")
# Query block of the XLA causal self-attention (`_xla_causal_blocks`).
CAUSAL_BLOCK = 128
# Run Pallas kernels in interpret mode (tests on CPU; `interpret=True` of the kernels).
INTERPRET = {"value": False}


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
    implementation: str = "auto",
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
      implementation: "auto" (the platform's fused kernel, module docstring), "xla" (the
        reference math), "splash" (TPU), "pallas_gpu" (Triton flash, GPU), "tokamax" (its flash
        kernels on GPU, its XLA reference elsewhere; causal self-attention), "cudnn" or "jax"
        (`jax.nn.dot_product_attention` with that implementation; "jax" is XLA's version of the
        same call, "cudnn" is GPU only). A kernel that cannot take the call falls back to XLA.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: not in {IMPLEMENTATIONS}")
    b, t, n, h = q.shape
    s = k.shape[1]
    if k.shape != (k.shape[0], s, n, h) or v.shape != k.shape:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    impl = resolve(implementation, q.shape, s, causal, q_segment_ids, q_positions, kv_positions)
    if impl == "splash":
        return _splash(q, k, v, causal, scale, q_segment_ids, kv_segment_ids)
    if impl == "pallas_gpu":
        return _pallas_gpu(q, k, v, causal, scale, q_segment_ids, kv_segment_ids)
    if impl == "tokamax":
        return _tokamax(q, k, v, causal, scale, q_segment_ids, kv_segment_ids)
    if impl == "cudnn" and q_positions is None and kv_positions is None and t == s:
        # Causality by the kernel (no mask array for it); packed segments still need a mask.
        seg = attention_mask(t, s, causal=False, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids)  # fmt: skip
        if seg is not None:
            seg = jnp.broadcast_to(seg, (b, 1, t, s))
        return jax.nn.dot_product_attention(
            q, k, v, mask=seg, scale=scale, is_causal=causal, implementation="cudnn"
        )
    plain_causal = causal and t == s and q_positions is None and kv_positions is None
    if impl == "xla" and plain_causal and t > CAUSAL_BLOCK:
        return _xla_causal_blocks(q, k, v, scale, q_segment_ids, kv_segment_ids)
    mask = attention_mask(
        t,
        s,
        causal=causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
    )
    if impl != "xla":
        if mask is not None:
            mask = jnp.broadcast_to(mask, (b, 1, t, s))
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            scale=scale,
            implementation=None if impl == "jax" else impl,
        )
    return _xla(q, k, v, scale, mask)


def _xla(q, k, v, scale, mask, kv="bsnh"):
    """The reference math: scores, the mask, softmax in float32, the weighted values. kv: the
    layout of k and v, "bsnh" or the cache's "bnsh"."""
    scores = jnp.einsum(f"btnh,{kv}->bnts", q, k).astype(jnp.float32) * scale
    if mask is not None:
        # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum(f"bnts,{kv}->btnh", probs, v)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal attention of new queries over a KV cache in the cache's own layout (XLA math).

    The cache keeps keys and values heads-major, [B, N, S, H] per layer (`qwen.init_cache`): the
    score and value products are then batched over (B, N) with H and S already their minor
    axes, so XLA runs them without first transposing the cache. With [B, S, N, H] keys it copied
    each layer's keys and values into that layout in every decode step (measured on a 2-core
    CPU, 4 heads x 32, 128 cached positions: 412 vs 100 us per call at 32 rows, 44 vs 32 us at
    one row).

    Args:
      q: [B, T, N, H] queries. k, v: [B, N, S, H] the cached keys and values.
      scale: multiplies the scores.
      q_positions: int [B, T] each query's cache slot; kv_positions: int [B, S] each key's.
      q_segment_ids, kv_segment_ids: int [B, T] / [B, S] as `dot_product_attention`'s.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s = k.shape[2]
    if k.shape != (b, n, s, h) or v.shape != k.shape:
        raise ValueError(f"cached attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    mask = attention_mask(
        t,
        s,
        causal=True,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
    )
    return _xla(q, k, v, scale, mask, kv="bnsh")


def _xla_causal_blocks(q, k, v, scale, q_seg, kv_seg):
    """Causal self-attention in XLA by blocks of CAUSAL_BLOCK queries, each against only the keys
    up to its last query: the same result as the full [T, T] scores, with the blocks above the
    diagonal never computed (at T = 512: 10 of 16 blocks, half the time of a layer's attention
    forward and backward on a 2-core CPU, and no [B, N, T, T] buffers)."""
    t = q.shape[1]
    outs = []
    for start in range(0, t, CAUSAL_BLOCK):
        end = min(start + CAUSAL_BLOCK, t)
        seg_q = None if q_seg is None else q_seg[:, start:end]
        seg_kv = None if kv_seg is None else kv_seg[:, :end]
        mask = attention_mask(
            end - start, end, causal=True, q_segment_ids=seg_q, kv_segment_ids=seg_kv
        )
        outs.append(_xla(q[:, start:end], k[:, :end], v[:, :end], scale, mask))
    return jnp.concatenate(outs, axis=1)


def target_platform() -> str:
    """The platform being compiled for: the active mesh's devices (an AOT topology mesh of TPU
    devices on a CPU host says "tpu"), else JAX's default backend."""
    from qwenvl_jax.model import layers

    ctx = layers.current_rules()
    if ctx is not None:
        return ctx.mesh.devices.flat[0].platform
    return jax.default_backend()


def resolve(
    implementation: str,
    q_shape: tuple,
    s: int,
    causal: bool,
    q_segment_ids=None,
    q_positions=None,
    kv_positions=None,
) -> str:
    """The implementation `auto` (or an explicit kernel name) means for this call; kernels fall
    back to "xla" where they cannot run (module docstring)."""
    if implementation not in ("auto", "splash", "pallas_gpu", "tokamax"):
        return implementation
    t = q_shape[1]
    explicit_positions = q_positions is not None or kv_positions is not None
    kernel = implementation
    if implementation == "auto":
        platform = target_platform()
        if platform == "tpu":
            kernel = "splash"
        elif platform in ("gpu", "cuda", "rocm"):
            # cuDNN for unmasked (ViT, adapter) and plain causal rows; Triton flash for packed ones.
            kernel = "pallas_gpu" if q_segment_ids is not None else "cudnn"
        else:
            return "xla"
    if explicit_positions:
        return "xla"  # cached decoding: causality by cache slot, not by index
    if kernel == "splash" and (t % 128 or s % 128):
        return "xla"  # splash tiles q and kv in blocks of 128 or more
    if kernel == "pallas_gpu" and (not causal or t != s or t % 16):
        return "cudnn" if implementation == "auto" else "xla"
    if kernel == "tokamax" and (not causal or t != s):
        return "xla"
    if kernel == "cudnn" and t != s and causal:
        return "xla"
    return kernel


def _block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    one = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    bq, bkv = _block(t), _block(s)
    sizes = sk.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )  # fmt: skip
    return sk.make_splash_mha(
        sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
        interpret=interpret,
    )  # fmt: skip


def _pad_head_dim(x: jax.Array, to: int) -> jax.Array:
    return x if x.shape[-1] == to else jnp.pad(x, [(0, 0)] * 3 + [(0, to - x.shape[-1])])


def _under_mesh(fn, q, k, v, q_seg, kv_seg):
    """Runs fn(q, k, v, q_seg, kv_seg) per device: shard_map over the batch axes and the heads
    (the activation rules' act_batch / act_heads) when a mesh is active, else directly."""
    from qwenvl_jax.model import layers

    ctx = layers.current_rules()
    if ctx is None or ctx.mesh.devices.size == 1:
        return fn(q, k, v, q_seg, kv_seg)
    P = jax.sharding.PartitionSpec
    spec = layers.logical_to_spec(("act_batch", None, "act_heads", None), ctx.rules)
    batch_ax, head_ax = spec[0], spec[2]

    def size(ax):
        axes = () if ax is None else (ax,) if isinstance(ax, str) else tuple(ax)
        return int(np.prod([ctx.mesh.shape[a] for a in axes])) if axes else 1

    if q.shape[0] % size(batch_ax):
        batch_ax = None
    if q.shape[2] % size(head_ax):
        head_ax = None
    x_spec = P(batch_ax, None, head_ax, None)
    seg_spec = P(batch_ax, None)
    return jax.shard_map(
        fn,
        mesh=ctx.mesh,
        in_specs=(x_spec, x_spec, x_spec, seg_spec, seg_spec),
        out_specs=x_spec,
        check_vma=False,
    )(q, k, v, q_seg, kv_seg)


def _splash(q, k, v, causal, scale, q_seg, kv_seg):
    """Splash attention: q [B, T, N, H] -> [B, T, N, H]; head dim padded to a multiple of 128."""
    b, t, n, h = q.shape
    s = k.shape[1]
    hp = -(-h // 128) * 128
    if q_seg is None:
        q_seg = jnp.ones((b, t), jnp.int32)
        kv_seg = jnp.ones((b, s), jnp.int32)

    def local(q, k, v, qs, ks):
        from jax.experimental.pallas.ops.tpu.splash_attention import (
            splash_attention_kernel as sk,
        )

        kernel = _splash_kernel(q.shape[2], t, s, causal, INTERPRET["value"])
        to_bnth = lambda x: jnp.swapaxes(_pad_head_dim(x, hp), 1, 2)  # noqa: E731
        qq = to_bnth(q * jnp.asarray(scale, q.dtype))
        seg = sk.SegmentIds(q=qs.astype(jnp.int32), kv=ks.astype(jnp.int32))
        out = jax.vmap(kernel)(qq, to_bnth(k), to_bnth(v), seg)
        return jnp.swapaxes(out, 1, 2)[..., :h].astype(q.dtype)

    return _under_mesh(local, q, k, v, q_seg, kv_seg)


def packed_k_start(segment_ids: jax.Array) -> jax.Array:
    """int [B, T]: the index of the first token of each token's run of equal segment ids.

    Causal attention with keys from k_start[i] to i is the segment mask of `attention_mask` when
    every segment is one contiguous run of the row (as packing lays samples out; padding, id 0,
    is the row's tail)."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    first = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return jax.lax.cummax(jnp.where(first, idx, 0), axis=1)


def _tokamax(q, k, v, causal, scale, q_seg, kv_seg):
    """tokamax's flash attention (`pip install tokamax`): Mosaic GPU on Hopper, Triton on other
    GPUs, its XLA reference elsewhere (CPU tests). Packed rows are a per-query first key
    (`packed_k_start`), so the kernel skips key blocks of earlier samples instead of reading a
    mask. tokamax's public `dot_product_attention` takes only a dense mask or one length per
    row, hence its Mask and kernel objects (tokamax 0.0.12)."""
    try:
        from tokamax._src.ops.attention import api as tk_api
        from tokamax._src.ops.attention import base as tk_base
    except ImportError as e:
        raise ImportError("attn_impl='tokamax' needs tokamax: pip install tokamax") from e
    platform = target_platform()
    if platform in ("gpu", "cuda"):
        names = [n for n in ("mosaic_gpu", "triton") if n in tk_api.IMPLEMENTATIONS]
    else:
        names = ["xla"]
    del kv_seg  # equal to q_seg for self-attention
    if q_seg is None:  # one sample per row: every key from the first
        q_seg = jnp.zeros(q.shape[:2], jnp.int32)

    def local(q, k, v, qs, ks):
        mask = tk_base.Mask(k_start=packed_k_start(qs)[:, None, :], is_causal=causal)
        for i, name in enumerate(names):
            try:
                return tk_api.IMPLEMENTATIONS[name](
                    q, k, v, bias=None, mask=mask, logits_scale=scale, precision=None,
                    logits_soft_cap=None, q_sharding=None,
                )  # fmt: skip
            except NotImplementedError:  # e.g. Mosaic GPU on a pre-Hopper card
                if i == len(names) - 1:
                    raise

    return _under_mesh(local, q, k, v, q_seg, q_seg)


def _pallas_gpu(q, k, v, causal, scale, q_seg, kv_seg):
    """The Pallas Triton flash kernel: self-attention, causal by index, segment ids (q's = kv's,
    which holds for the packed decoder rows that reach it)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    t = q.shape[1]
    block = next(bl for bl in (128, 64, 32, 16) if t % bl == 0)
    sizes = gpu_attention.BlockSizes(
        block_q=block, block_k=block, block_q_dkv=min(32, block), block_kv_dkv=min(32, block),
        block_q_dq=min(32, block), block_kv_dq=min(32, block),
    )  # fmt: skip
    del kv_seg  # equal to q_seg for self-attention

    def local(q, k, v, qs, ks):
        return gpu_attention.mha(
            q, k, v, qs, sm_scale=scale, causal=causal, block_sizes=sizes,
            interpret=INTERPRET["value"],
        )  # fmt: skip

    return _under_mesh(local, q, k, v, q_seg, q_seg)
