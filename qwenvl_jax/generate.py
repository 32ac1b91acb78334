"""Autoregressive generation with a preallocated KV cache: a prefill, then an on-device loop.

`generate` runs the prompt through the model once (`_prefill`, the LM head at the last prompt
position only), then decodes every further token inside one compiled `lax.while_loop` (`_decode`):
the stacked cache [L, B, N, S, H] is a loop carry that each layer updates in place with one
`dynamic_update_slice` at its layer index (`qwen.write_cache`; donated, so no second copy exists,
and no per-layer slice is re-stacked: `tests/test_generate_inplace.py` reads the compiled HLO for
it), stop words, eos and
`min_new_tokens` are applied on the device per row, and the loop ends when every row is done or
`max_new_tokens` is reached. The host sees the result once. Both functions are compiled once per
shape bucket: prompts are right-padded to a multiple of `prefill_bucket` (padding sits after the
real tokens, so causal attention never sees it, and decode overwrites those cache slots), the cache
length is rounded up to a multiple of `cache_bucket`, and the batch can be padded to a multiple of
`batch_multiple`; `max_new_tokens`, `min_new_tokens`, temperature and top_p are runtime values.

Dynamic NTK (alpha from the prompt length, fixed at prefill) and logn scaling follow the config's
`use_dynamic_ntk` / `use_logn_attn`, as the reference does at inference. Alpha is a static
argument, so prompts past `seq_length` add one compilation per alpha value (3, 7, 15, ...).

Batches of prompts with different lengths are left-padded with segment id 0, and rotary positions
count the padding, as the reference's batched generation does.

Sharded inference: with a `mesh` (the one the parameters were placed on, see
`QwenVL.from_pretrained(mesh=...)`), activations follow `sharding.DEFAULT_RULES` (batch over
data x fsdp where it divides, heads / MLP / vocabulary over model) and the KV cache is created
sharded the same way ([L, B, N, S, H]: batch and heads split).

`generate_stepwise` is the earlier path (one compiled decode step per token, dispatched from a
Python loop); it is kept for the decode benchmark's comparison (`python -m qwenvl_jax.bench
--mode=decode`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax import sharding as shd
from qwenvl_jax.model import layers
from qwenvl_jax.model.qwen import inference_scaling, init_cache
from qwenvl_jax.model.qwenvl import QWenLMHeadModel
from qwenvl_jax.tokenizer import image_token_index

EOD_ID = 151643  # <|endoftext|>, the eos of Qwen-VL's generation_config

# Stop-word table fillers (token ids are >= 0 and the "recent tokens" window starts at -1).
_ANY = -2  # left of a stop word shorter than the table: matches anything
_NEVER = -3  # a padding word: matches nothing

_STATIC = ("graphdef", "ntk_alpha", "use_logn", "do_sample", "top_k", "ctx")


# ----------------------------------------------------------------------------- sharding context
@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """Hashable (static) sharding of one generation shape: the mesh and the activation rules."""

    mesh: jax.sharding.Mesh
    rules: tuple

    def scope(self):
        return layers.logical_rules(self.mesh, self.rules)


def inference_rules(mesh: jax.sharding.Mesh, batch: int) -> tuple:
    """The training rules, with the batch left unsplit when data x fsdp does not divide it."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return tuple(
        (name, None if name == "act_batch" and batch % n else axes)
        for name, axes in shd.DEFAULT_RULES
    )


def _scope(ctx: ShardingContext | None):
    return contextlib.nullcontext() if ctx is None else ctx.scope()


def cache_shardings(cfg, mesh: jax.sharding.Mesh, batch: int) -> dict:
    """NamedShardings of `init_cache`'s arrays: batch over data x fsdp, heads over model."""
    kv = (cfg.num_hidden_layers, batch, cfg.num_attention_heads, 1, cfg.head_dim)
    names = ("layers", "act_batch", "act_heads", None, None)
    spec = shd.logical_to_spec(names, kv, mesh, shd.DEFAULT_RULES)
    seg = PartitionSpec(spec[1], None)
    return {
        "k": NamedSharding(mesh, spec),
        "v": NamedSharding(mesh, spec),
        "segment_ids": NamedSharding(mesh, seg),
    }


def make_cache(cfg, batch: int, length: int, dtype, mesh=None) -> dict:
    """`init_cache`, created directly in its sharded layout when a mesh is given."""
    if mesh is None:
        return init_cache(cfg, batch, length, dtype)
    out = cache_shardings(cfg, mesh, batch)
    return jax.jit(lambda: init_cache(cfg, batch, length, dtype), out_shardings=out)()


# ----------------------------------------------------------------------------- token selection
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


def _choose(logits, step, rng, sampling, *, do_sample, top_k):
    """Token `step` of every row from float32 [B, V] logits: eos is barred while step <
    min_new_tokens (HF's MinNewTokensLengthLogitsProcessor), then greedy or sampled."""
    temperature, top_p, min_new, eos = sampling
    barred = (jnp.arange(logits.shape[-1]) == eos) & (step < min_new)
    logits = jnp.where(barred, -jnp.inf, logits)
    key = jax.random.fold_in(rng, step)
    return _select(logits, key, temperature, top_p, do_sample=do_sample, top_k=top_k)


# ----------------------------------------------------------------------------- compiled steps
@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _prefill(graphdef, state, input_ids, segment_ids, images, token_index, cache, last, rng,
             sampling, *, ntk_alpha, use_logn, do_sample, top_k, ctx=None):  # fmt: skip
    """The prompt through the model; returns (the first new token int32 [B], the filled cache).

    The LM head runs at position `last` only (the [B, T, V] logits of the whole prompt are never
    formed: at the published vocabulary that would be T * 151,936 floats per row)."""
    with _scope(ctx):
        model = nnx.merge(graphdef, state)
        hidden, cache = model.hidden_states(
            input_ids,
            images=images,
            image_token_index=token_index,
            segment_ids=segment_ids,
            cache=cache,
            cache_index=0,
            ntk_alpha=ntk_alpha,
            use_logn=use_logn,
        )
        logits = model.logits(hidden[:, last]).astype(jnp.float32)
        chosen = _choose(logits, 0, rng, sampling, do_sample=do_sample, top_k=top_k)
    return chosen, cache


def _stop_hit(recent: jax.Array, stops: jax.Array) -> jax.Array:
    """bool [B]: the row's last tokens `recent` [B, L] end with one of the words `stops` [W, L]."""
    match = (stops[None] == _ANY) | (stops[None] == recent[:, None, :])  # [B, W, L]
    return jnp.any(jnp.all(match, axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode(graphdef, state, first, cache, recent, stops, prompt_len, max_new, rng, sampling, *,
            ntk_alpha, use_logn, do_sample, top_k, ctx=None):  # fmt: skip
    """Every token after the first, in one `lax.while_loop` on the device.

    Args:
      first: int32 [B], the prefill's token 0 (before stop words / eos are applied).
      cache: the prefilled cache (donated; the loop updates it in place).
      recent: int32 [B, L], each row's last L prompt ids (-1 before the start).
      stops: int32 [W, L], stop words right-aligned (`_ANY` to their left, `_NEVER` rows unused).
      prompt_len: int32, the cache slot of token 0. max_new: int32, the most tokens per row.

    Returns:
      (tokens int32 [B, S] (S = cache length >= max_new; eos after a row's end), lengths int32
      [B] (tokens up to and including eos), the cache).
    """
    eos = sampling[3]
    bsz, out_len = first.shape[0], cache["segment_ids"].shape[1]

    def finish(tok, recent, done):
        # The reference's StopWordsLogitsProcessor: a sequence ending in a stop word gets eos next;
        # finished rows keep emitting eos (HF pads them with pad_token_id = eos).
        return jnp.where(done | _stop_hit(recent, stops), eos, tok)

    def push(recent, tok):
        return jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)

    with _scope(ctx):
        model = nnx.merge(graphdef, state)
        tok = finish(first, recent, jnp.zeros(bsz, bool))
        out = jnp.full((bsz, out_len), eos, jnp.int32).at[:, 0].set(tok)
        carry = (
            jnp.int32(1),
            tok,
            cache,
            push(recent, tok),
            tok == eos,
            out,
            jnp.ones(bsz, jnp.int32),
        )

        def cond(c):
            step, _, _, _, done, _, _ = c
            return (step < max_new) & ~jnp.all(done)

        def body(c):
            step, tok, cache, recent, done, out, lengths = c
            logits, cache = model(
                tok[:, None],
                cache=cache,
                cache_index=prompt_len + step - 1,
                ntk_alpha=ntk_alpha,
                use_logn=use_logn,
            )
            nxt = _choose(logits[:, 0].astype(jnp.float32), step, rng, sampling,
                          do_sample=do_sample, top_k=top_k)  # fmt: skip
            nxt = finish(nxt, recent, done)
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
            lengths = jnp.where(done, lengths, step + 1)
            return step + 1, nxt, cache, push(recent, nxt), done | (nxt == eos), out, lengths

        _, _, cache, _, _, out, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths, cache


# ----------------------------------------------------------------------------- host side
def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclasses.dataclass
class _Batch:
    single: bool
    rows: list  # the caller's prompts (padding rows excluded)
    padded_rows: list  # rows + the batch padding
    ids: np.ndarray  # int32 [B, padded_len], left-padded to prompt_len, right-padded to the bucket
    seg: np.ndarray
    images: jax.Array | None
    token_index: jax.Array | None
    prompt_len: int


def _prepare(cfg, input_ids, images, max_new_tokens, do_sample, temperature, prefill_bucket,
             batch_multiple) -> _Batch:  # fmt: skip
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
    bad = [(b, t) for b, r in enumerate(rows) for t in r if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(
            f"prompt ids outside the vocabulary [0, {cfg.vocab_size}): (row, id) {bad[:5]}"
        )
    if images is None and any(cfg.visual.image_start_id in r for r in rows):
        raise ValueError(
            "the prompt holds <img> spans but no images were given: pass images=[M, S, S, 3] "
            "(or [B, M, S, S, 3]) in span order"
        )
    n_real = len(rows)
    # Padding rows (copies of row 0) keep one compiled shape per batch bucket; dropped at the end.
    bsz = _round_up(n_real, max(1, batch_multiple))
    padded_rows = rows + [rows[0]] * (bsz - n_real)
    prompt_len = max(len(r) for r in rows)
    padded_len = _round_up(prompt_len, prefill_bucket)
    ids = np.zeros((bsz, padded_len), np.int32)
    seg = np.zeros((bsz, padded_len), np.int32)
    # QWEN-QUIRK: rotary positions ignore the padding mask (arange over the padded row), so a
    # left-padded row's tokens sit at shifted positions, as in the reference's batched generation.
    for b, r in enumerate(padded_rows):  # left-pad to the longest prompt, right-pad to the bucket
        ids[b, prompt_len - len(r) : prompt_len] = r
        seg[b, prompt_len - len(r) : prompt_len] = 1
    token_index = None
    if images is not None:
        images = np.asarray(images, np.float32)
        if single:
            images = images[None]
        if images.ndim == 5 and images.shape[0] == n_real and bsz > n_real:
            images = np.concatenate([images, np.repeat(images[:1], bsz - n_real, 0)])
        token_index, counts = image_token_index(
            ids, cfg.visual.image_start_id, cfg.visual.n_queries
        )
        if images.ndim != 5 or images.shape[0] != bsz or (counts > images.shape[1]).any():
            raise ValueError(
                f"images of shape {images.shape} do not cover the prompts' image spans "
                f"(spans per row: {counts[:n_real].tolist()})"
            )
        token_index = jnp.asarray(token_index)
        images = jnp.asarray(images)
    return _Batch(single, rows, padded_rows, ids, seg, images, token_index, prompt_len)


def _stop_table(stop_words_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """int32 [W, L]: stop words right-aligned, W and L rounded up to 4 (fewer compilations)."""
    words = [list(map(int, w)) for w in stop_words_ids if len(w)]
    width = _round_up(max([len(w) for w in words] + [1]), 4)
    table = np.full((_round_up(max(len(words), 1), 4), width), _NEVER, np.int32)
    for i, w in enumerate(words):
        table[i] = _ANY
        table[i, width - len(w) :] = w
    return table


def generate(
    model: QWenLMHeadModel,
    input_ids,
    *,
    images=None,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_words_ids: Sequence[Sequence[int]] = (),
    eos_token_id: int = EOD_ID,
    rng: jax.Array | None = None,
    prefill_bucket: int = 64,
    cache_bucket: int = 128,
    batch_multiple: int = 1,
    mesh: jax.sharding.Mesh | None = None,
):
    """Generate continuations of one prompt or a batch of prompts (on-device decode loop).

    Args:
      model: the QWenLMHeadModel (its parameters placed on `mesh` when one is given).
      input_ids: one prompt (a list of ids or a 1-D array) or a batch (list of lists, or [B, T]).
        Image spans (`<img>` + n_queries ids + `</img>`) are located with `image_token_index`.
      images: float32 [M, S, S, 3] (one prompt) or [B, M, S, S, 3], CLIP-normalised; image m of a
        row fills that row's m-th span. None for text only.
      max_new_tokens: the most tokens generated per row (a forced eos counts).
      min_new_tokens: eos is barred before this many new tokens (the eval scripts' setting).
      do_sample: sample (with temperature, top_k, top_p as HF's warpers) instead of greedy.
      stop_words_ids: id sequences; once a row's sequence (prompt included) ends with one of them
        its next token is forced to eos_token_id, as the reference's StopWordsLogitsProcessor.
      eos_token_id: a row stops after this id (it is included in the output).
      rng: a jax PRNG key for sampling (default key 0).
      prefill_bucket, cache_bucket: shape rounding that bounds the number of compilations.
      batch_multiple: pad the batch (with copies of the first prompt, dropped from the output) to
        a multiple of this, e.g. the evaluation batch size, so a short last batch reuses the
        compilation. With a mesh the batch is also padded to a multiple of data x fsdp.
      mesh: the mesh the parameters live on; shards the cache and the activations.

    Returns:
      The new ids: list[int] for one prompt, list[list[int]] for a batch (each up to and
      including eos, or max_new_tokens long).
    """
    cfg = model.config
    if mesh is not None:
        batch_multiple = math.lcm(batch_multiple, mesh.shape["data"] * mesh.shape["fsdp"])
    x = _prepare(cfg, input_ids, images, max_new_tokens, do_sample, temperature, prefill_bucket,
                 batch_multiple)  # fmt: skip
    bsz = x.ids.shape[0]
    cache_len = max(_round_up(x.prompt_len + max_new_tokens, cache_bucket), x.ids.shape[1])
    scaling = inference_scaling(cfg, x.prompt_len)
    ctx = None if mesh is None else ShardingContext(mesh, inference_rules(mesh, bsz))
    static = dict(
        ntk_alpha=scaling["ntk_alpha"],
        use_logn=scaling["use_logn"],
        do_sample=do_sample,
        top_k=int(top_k),
        ctx=ctx,
    )
    rng = jax.random.key(0) if rng is None else rng
    sampling = (np.float32(temperature), np.float32(top_p), np.int32(min_new_tokens),
                np.int32(eos_token_id))  # fmt: skip
    graphdef, state = nnx.split(model)
    cache = make_cache(cfg, bsz, cache_len, model.dtype, mesh)
    first, cache = _prefill(graphdef, state, x.ids, x.seg, x.images, x.token_index, cache,
                            x.prompt_len - 1, rng, sampling, **static)  # fmt: skip
    stops = _stop_table(stop_words_ids)
    width = stops.shape[1]
    recent = np.full((bsz, width), -1, np.int32)  # each row's last prompt ids, for stop words
    for b, r in enumerate(x.padded_rows):
        tail = r[-width:]
        recent[b, width - len(tail) :] = tail
    out, lengths, _ = _decode(graphdef, state, first, cache, recent, stops,
                              np.int32(x.prompt_len), np.int32(max_new_tokens), rng, sampling,
                              **static)  # fmt: skip
    out, lengths = np.asarray(out), np.asarray(lengths)  # the one host transfer
    result = [out[b, : lengths[b]].tolist() for b in range(len(x.rows))]
    return result[0] if x.single else result


# ----------------------------------------------------------------------------- the earlier path
@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode_step(graphdef, state, tokens, cache, index, step, rng, sampling, *, ntk_alpha,
                 use_logn, do_sample, top_k, ctx=None):  # fmt: skip
    """One token per row written at cache slot `index`; returns (token `step` int32 [B], cache)."""
    with _scope(ctx):
        model = nnx.merge(graphdef, state)
        logits, cache = model(
            tokens[:, None], cache=cache, cache_index=index, ntk_alpha=ntk_alpha, use_logn=use_logn
        )
        chosen = _choose(logits[:, 0].astype(jnp.float32), step, rng, sampling,
                         do_sample=do_sample, top_k=top_k)  # fmt: skip
    return chosen, cache


def _ends_with(seq: list[int], stops: Sequence[Sequence[int]]) -> bool:
    return any(len(s) <= len(seq) and list(seq[len(seq) - len(s) :]) == list(s) for s in stops)


def generate_stepwise(
    model: QWenLMHeadModel,
    input_ids,
    *,
    images=None,
    max_new_tokens: int,
    stop_words_ids: Sequence[Sequence[int]] = (),
    eos_token_id: int = EOD_ID,
    prefill_bucket: int = 64,
    cache_bucket: int = 128,
):
    """Greedy `generate` as it was before the on-device loop: one compiled decode step per token,
    dispatched from Python, with a host round trip per token. Single device; kept as the decode
    benchmark's baseline (`python -m qwenvl_jax.bench --mode=decode`)."""
    cfg = model.config
    x = _prepare(cfg, input_ids, images, max_new_tokens, False, 1.0, prefill_bucket, 1)
    bsz = x.ids.shape[0]
    cache_len = max(_round_up(x.prompt_len + max_new_tokens, cache_bucket), x.ids.shape[1])
    scaling = inference_scaling(cfg, x.prompt_len)
    static = dict(ntk_alpha=scaling["ntk_alpha"], use_logn=scaling["use_logn"], do_sample=False,
                  top_k=0, ctx=None)  # fmt: skip
    rng = jax.random.key(0)
    sampling = (np.float32(1), np.float32(1), np.int32(0), np.int32(eos_token_id))
    graphdef, state = nnx.split(model)
    cache = init_cache(cfg, bsz, cache_len, model.dtype)
    chosen, cache = _prefill(graphdef, state, x.ids, x.seg, x.images, x.token_index, cache,
                             x.prompt_len - 1, rng, sampling, **static)  # fmt: skip
    seqs = [list(r) for r in x.rows]
    out: list[list[int]] = [[] for _ in x.rows]
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
        chosen, cache = _decode_step(graphdef, state, chosen, cache,
                                     np.int32(x.prompt_len + step), np.int32(step + 1), rng,
                                     sampling, **static)  # fmt: skip
    return out[0] if x.single else out
