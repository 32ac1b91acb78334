"""The serving engine's compiled programs: image encoding, one prefill chunk, one decode step.

All three are module-level `jax.jit`s with the model's graphdef static, so every engine over the
same model shares the compilations. The engine passes the graphdef wrapped in `Static`: jit hashes
its static arguments on every call, and hashing a flax GraphDef walks the whole module tree
(~0.3 ms, a tenth of a 32-row decode step of a small model); `Static` hashes it once.

The KV cache is the engine's slot cache ([L, B, N, S, H], `qwen.init_cache` layout, one row per
slot) and is donated: the decode step writes each row's new k/v in place at that row's own
position (`qwen.write_cache`, one scatter per layer).
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from qwenvl_jax.generate import _scope, cache_shardings, warp_logits


class Static:
    """A graphdef as a jit static argument, its hash computed once (equal graphdefs stay equal,
    so engines over the same model still share the compiled programs)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if not isinstance(other, Static):
            return NotImplemented
        return self is other or (self._hash == other._hash and self.value == other.value)


def _merge(graphdef, state):
    """nnx.merge of a graphdef, plain or wrapped in `Static`."""
    return nnx.merge(graphdef.value if isinstance(graphdef, Static) else graphdef, state)


def _slot_axes(cache, mesh):
    """The cache's PartitionSpecs on `mesh` and the mesh axes of its slot axis (None: unsplit).
    The layout is `generate.cache_shardings`' (its one owner), rebuilt from the cache's shape."""
    if mesh is None:
        return None, None
    layers, rows, heads, _, head_dim = cache["k"].shape
    cfg = types.SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads,
                                head_dim=head_dim)  # fmt: skip
    specs = {k: s.spec for k, s in cache_shardings(cfg, mesh, rows).items()}
    return specs, specs["segment_ids"][0]


def _row_spec(spec):
    """`spec` with the slot axis (1 for k/v, 0 for segment ids) unsplit: one slot's block."""
    axis = _axes(len(spec))[0]
    return PartitionSpec(*(None if i == axis else a for i, a in enumerate(spec)))


def _axes(ndim: int):
    """(slot axis, position axis) of a cache array of `ndim` dimensions: k/v [L, B, N, S, H],
    segment ids [B, S]."""
    return (0, 1) if ndim == 2 else (1, 3)


def _local(x, axis, axes, slot):
    """(clamped local row of `slot` in this shard's block of x, whether the shard holds it)."""
    n = x.shape[axis]
    local = slot - jax.lax.axis_index(axes) * n
    own = (local >= 0) & (local < n)
    return jnp.clip(local, 0, n - 1), own


def read_slot(cache, slot, start, size, mesh=None):
    """{k, v, segment_ids} of slot `slot` (int32), positions start..start+size-1: k/v
    [L, 1, N, size, H], segment ids [1, size].

    Where the slot axis is split over the mesh, a dynamic slice of it would make XLA's SPMD
    partitioner gather the whole cache onto every chip; instead each shard slices its own block at
    its local row (zeros where the slot is not its own) and one psum of the small block assembles
    it, replicated over the slot axes.
    """
    specs, axes = _slot_axes(cache, mesh)

    def piece(x, slot, start, axes=None):
        axis, pos = _axes(x.ndim)
        local, own = (slot, True) if axes is None else _local(x, axis, axes, slot)
        at = [0] * x.ndim
        at[axis], at[pos] = local, start
        shape = list(x.shape)
        shape[axis], shape[pos] = 1, size
        out = jax.lax.dynamic_slice(x, at, shape)
        if axes is None:
            return out
        return jax.lax.psum(jnp.where(own, out, jnp.zeros_like(out)), axes)

    if axes is None:
        return {k: piece(x, slot, start) for k, x in cache.items()}
    fn = jax.shard_map(
        lambda c, slot, start: {k: piece(x, slot, start, axes) for k, x in c.items()},
        mesh=mesh,
        in_specs=(specs, PartitionSpec(), PartitionSpec()),
        out_specs={k: _row_spec(s) for k, s in specs.items()},
    )
    return fn(cache, slot, start)


def write_slot(cache, block, slot, start, mesh=None):
    """`cache` with `block` ({k, v, segment_ids} shaped as `read_slot`'s) written into slot `slot`
    at positions start...: in place when the cache is donated.

    On a mesh that splits the slot axis each shard updates only its own block: it writes at its
    local row either the new block (its slot) or the block already there (a select on the small
    block, not on the cache), so no chip holds more than its share of the cache.
    """
    specs, axes = _slot_axes(cache, mesh)

    def put(x, b, slot, start, axes=None):
        axis, pos = _axes(x.ndim)
        b = b.astype(x.dtype)
        local, own = (slot, True) if axes is None else _local(x, axis, axes, slot)
        at = [0] * x.ndim
        at[axis], at[pos] = local, start
        if axes is not None:
            b = jnp.where(own, b, jax.lax.dynamic_slice(x, at, b.shape))
        return jax.lax.dynamic_update_slice(x, b, at)

    if axes is None:
        return {k: put(x, block[k], slot, start) for k, x in cache.items()}
    rows = {k: _row_spec(s) for k, s in specs.items()}
    fn = jax.shard_map(
        lambda c, b, slot, start: {k: put(x, b[k], slot, start, axes) for k, x in c.items()},
        mesh=mesh,
        in_specs=(specs, rows, PartitionSpec(), PartitionSpec()),
        out_specs=specs,
    )
    return fn(cache, block, slot, start)


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
        model = _merge(graphdef, state)
        return model.transformer.visual(pixels.astype(model.dtype))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "kv_len", "use_logn", "ctx"), donate_argnames=("cache",)
)
def prefill_chunk(graphdef, state, cache, slot, ids, seg, start, features, token_index, *, kv_len,
                  use_logn, ctx=None):  # fmt: skip
    """One prompt chunk of one slot into the slot cache: its keys and values only (no logits: the
    prompt's last token is fed by the row's first decode step, which gives its first new token).

    Args:
      cache: the slot cache (donated). slot: int32, the row. start: int32, the chunk's first slot.
      ids, seg: int32 [1, T] (right-padded to the bucket with segment 0).
      features: [1, K, D] adapter outputs of the request's images, or None; token_index: int32
        [1, T] into K (-1 for text), or None.
      kv_len: static, the cache slots the chunk attends over (>= start + T, a bucket).

    Returns:
      the cache.
    """
    mesh = None if ctx is None else ctx.mesh
    with _scope(ctx):
        model = _merge(graphdef, state)
        # This row's first kv_len slots, run as a batch-1 cache, then written back.
        row = read_slot(cache, slot, 0, kv_len, mesh)
        _, row = model.hidden_states(
            ids,
            segment_ids=seg,
            cache=row,
            cache_index=start,
            image_features=features,
            image_token_index=token_index,
            use_logn=use_logn,
        )
    return write_slot(cache, row, slot, 0, mesh)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "kv_len", "use_logn", "ctx", "n_steps"),
    donate_argnames=("cache",),
)
def decode_step(graphdef, state, cache, tokens, positions, active, sampling, steps, *, kv_len,
                use_logn, ctx=None, n_steps=1):  # fmt: skip
    """`n_steps` new tokens for each of the first B slots (B <= the cache's rows: a bucket that
    holds every running row, so a lightly loaded engine does not compute its empty slots), each
    step feeding the last one's tokens.

    Args:
      cache: the slot cache (donated; updated in place).
      tokens: int32 [B], each row's last token, written at `positions` [B] (rows that are not
        decoding pass a position past the cache: their writes are dropped).
      active: bool [B]. sampling: (temperature, top_p, seed) float32/float32/int32 [B].
      steps: int32 [B], each row's index of the token being chosen (its sampling key).
      kv_len: static bucket >= every active row's position + n_steps: attention reads only those
        slots.
      n_steps: static, decode steps in this one call (one host round trip for all of them). A
        row that ends mid-way (eos, its length, a stop sequence) decodes on; the engine drops
        its later tokens, which are then exactly the tokens one step per call would have made
        up to that point, and its later cache writes lie past its end (a slot's next request
        overwrites or never attends them).

    Returns:
      (int32 [n_steps, B] next tokens, the cache).
    """
    rows = tokens.shape[0]
    live = active.astype(jnp.int32)
    with _scope(ctx):
        model = _merge(graphdef, state)

        def one(i, carry):
            cache, tokens, out = carry
            seg = cache["segment_ids"][:rows, :kv_len]
            view = {"k": cache["k"], "v": cache["v"], "segment_ids": seg}
            hidden, view = model.hidden_states(
                tokens[:, None],
                segment_ids=live[:, None],
                cache=view,
                cache_index=positions + i * live,  # inactive rows stay past the cache
                use_logn=use_logn,
            )
            logits = model.logits(hidden[:, 0]).astype(jnp.float32)
            nxt = select_tokens(logits, *sampling, steps + i)
            seg = jax.lax.dynamic_update_slice(cache["segment_ids"], view["segment_ids"], (0, 0))
            cache = {"k": view["k"], "v": view["v"], "segment_ids": seg}
            return cache, nxt, out.at[i].set(nxt)

        out = jnp.zeros((n_steps, rows), jnp.int32)
        if n_steps == 1:
            cache, _, out = one(0, (cache, tokens, out))
        else:
            cache, _, out = jax.lax.fori_loop(0, n_steps, one, (cache, tokens, out))
    return out, cache


@functools.partial(jax.jit, static_argnames=("size", "mesh"))
def read_block(cache, slot, start, *, size, mesh=None):
    """The keys and values [L, 1, N, size, H] of slot `slot` from position `start` (int32s): a
    prefilled prompt block to keep in the engine's prefix cache. mesh: the cache's, if any."""
    row = read_slot(cache, slot, start, size, mesh)
    return row["k"], row["v"]


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("cache",))
def write_block(cache, slot, start, k, v, *, mesh=None):
    """A kept block k, v [L, 1, N, T, H] into slot `slot` at positions start..start+T-1 (segment 1),
    in place: the slot then holds that prompt prefix as if it had been prefilled."""
    seg = jnp.ones((1, k.shape[3]), jnp.int32)
    return write_slot(cache, {"k": k, "v": v, "segment_ids": seg}, slot, start, mesh)
