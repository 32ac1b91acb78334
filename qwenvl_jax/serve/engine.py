"""The serving engine: continuous batching over a preallocated slot cache, with an image cache.

`Engine(model)` owns one scheduler thread and a KV cache of `max_batch` slots x `max_seq_len`
positions, created once on the device (sharded over the model's mesh as `generate`'s cache:
`generate.make_cache`). Each scheduler iteration:

1. admits waiting requests into free slots. Their images not already in the feature cache are
   encoded together, in one batch through the ViT and the adapter (`_steps.encode_images`); the
   adapter outputs are kept in an LRU keyed by `ImageInput.key` and bounded in MB, so an image sent
   in ten requests is encoded once;
2. prefills: up to `prefill_chunk` prompt tokens per iteration, one slot at a time, in chunks of
   at most `prefill_chunk` tokens right-padded to a bucket (`_chunk_bucket`; a long prompt takes
   several iterations, and the running rows decode between its chunks). The chunks stop one
   token short of the prompt's end: the last prompt token is the row's first decode input, so its
   logits (the first new token) come out of the batched decode step and not out of a one-row
   projection onto the vocabulary per request. A prompt whose leading
   64-token blocks were prefilled before (the same system prompt, the same image in the same
   place) starts after them: their keys and values are kept on the device, keyed by a chained
   hash of the tokens and images up to the block's end (they depend on nothing else: attention is
   causal), least recently used out past `prefix_cache_mb`, and copied into the slot;
3. runs `decode_steps` (default 4) decode steps in one compiled call over the first slots, a
   power-of-two bucket that holds every running row (requests take the lowest free slot;
   `_steps.decode_step`): each row feeds its last token at its own position (a per-row
   `cache_index`, written in place), with its own temperature, top-p and seed; the attention
   reads only the first `kv_len` cache positions, the smallest bucket that holds every running
   row. Stop sequences, eos and the length limit are applied per row on the host afterwards,
   token by token, as `generate` does on the device (a row whose sequence ends with a stop
   sequence gets eos next); the tokens a row made after its end are dropped, so greedy answers
   equal `QwenVL.generate` token for token. A finished or cancelled row leaves and its slot
   takes the next request.

Why several steps per call: on a CPU the host's share of a step (the dispatch, the transfer
back, handing each row its token, waking the HTTP side and one server-sent event per token)
was most of a small model's step; four steps per call pay it once per four tokens and hand a
row four tokens at once (one event, one chunk). The price: a new request waits up to four steps
to join, and a row that ends mid-call holds its slot for the rest of it. The consumers of one
iteration's events are woken together (`_Wakeups`: one cross-thread call per event loop, not
one per row and token).

Programs are compiled per bucket (prefill: chunk length x attended length x image count; decode:
rows x attended length, each `decode_steps` steps); `start` compiles the decode steps and the
first-chunk prefills and logs how many programs exist (`stats()["n_compiled"]` counts later ones
too). JAX's persistent compilation cache is used when it is configured (`compiler.enable_cache`,
as the trainer does).

Why a contiguous slot cache and not a paged one: every slot holds `max_seq_len` positions, so the
memory is `max_batch x max_seq_len` whatever the lengths, and a paged cache (vLLM's blocks) could
fit more short rows in the same memory. On XLA a paged cache costs a gather of the row's blocks
in every layer of every step (or a custom kernel per backend), while the contiguous rows are read
as one slice whose length follows the longest running row (the `kv_len` bucket), so the cost per
step tracks the real lengths without a block table. We size slots for the longest request we
accept, prefer the simpler cache, and leave paging for when memory, not compute, limits the batch.

Prompts longer than the config's `seq_length` would need a per-row dynamic-NTK alpha; the engine
refuses a `max_seq_len` above `seq_length` when the model uses dynamic NTK (`PromptTooLong` names
the limit).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax import generate as gen_lib
from qwenvl_jax.serve import _steps
from qwenvl_jax.tokenizer import image_token_index

log = logging.getLogger(__name__)
KV_BUCKET = 128  # the smallest attended-length bucket; the others double up to the cache length
MIN_CHUNK = 64  # the smallest prefill bucket
PREFIX_BLOCK = 64  # prompt tokens per prefix-cache block
DECODE_STEPS = 4  # decode steps per compiled call (Engine's decode_steps)


# ----------------------------------------------------------------------------- the interface
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-request decoding parameters.

    max_tokens: the most new tokens (a forced eos counts). temperature: 0 = greedy. top_p: nucleus
    mass (1 = off). seed: the sampling PRNG seed (None: 0). stop_ids: token-id stop sequences;
    once the sequence ends with one, the next token is eos (the reference's
    StopWordsLogitsProcessor, as `QwenVL.generate`).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[tuple[int, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One image of a request: `key` (sha256 hex of the original bytes: the feature cache key) and
    `pixels` float32 [S, S, 3], preprocessed as `qwenvl_jax.image` does for the model."""

    key: str
    pixels: np.ndarray


@dataclasses.dataclass
class EngineRequest:
    """prompt_ids: ids with expanded `<img>...</img>` spans; images: one per span, in order."""

    prompt_ids: list[int]
    images: list[ImageInput]
    sampling: Sampling


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already (HTTP 429)."""


class PromptTooLong(ValueError):
    """The prompt leaves no room for a new token within `max_seq_len` (HTTP 400)."""


@dataclasses.dataclass
class Event:
    """kind "token" (token), "done" (finish_reason, usage) or "error" (message)."""

    kind: str
    token: int | None = None
    finish_reason: str | None = None
    message: str | None = None
    usage: dict | None = None


class _Wakeups:
    """Wakes the asyncio consumers of an engine once per scheduler iteration, not once per event:
    while `collecting` (the scheduler thread, inside an iteration) pushes only note their
    waiters, and `flush` sets all of a loop's events in one `call_soon_threadsafe` (32 rows
    otherwise cost the event loop 32 cross-thread wake-ups per decode step)."""

    def __init__(self):
        self._thread: int | None = None
        self._pending: dict = {}

    def collecting(self) -> None:
        self._thread = threading.get_ident()

    def add(self, loop, aev) -> bool:
        """Defer this wake-up (True) when called on the collecting thread."""
        if self._thread != threading.get_ident():
            return False
        self._pending.setdefault(loop, set()).add(aev)
        return True

    def flush(self) -> None:
        self._thread = None
        pending, self._pending = self._pending, {}
        for loop, aevs in pending.items():
            try:
                loop.call_soon_threadsafe(_set_all, aevs)
            except RuntimeError:  # the consumer's loop is closed: nobody listens any more
                pass


def _set_all(aevs) -> None:
    for aev in aevs:
        aev.set()


class Handle:
    """One submitted request: its events (blocking or async) and `cancel`."""

    def __init__(self, req: EngineRequest, wakeups: _Wakeups | None = None):
        self.request = req
        self._events: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._wakeups = wakeups
        self.cancelled = False
        self.finished = False

    def _push(self, ev: Event) -> None:
        with self._cond:
            self._events.append(ev)
            if ev.kind in ("done", "error"):
                self.finished = True
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, aev in waiters:
            if self._wakeups is not None and self._wakeups.add(loop, aev):
                continue
            try:
                loop.call_soon_threadsafe(aev.set)
            except RuntimeError:  # the consumer's loop is closed: nobody listens any more
                pass

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come; ends after "done" or "error". `timeout` (s) bounds each wait
        (TimeoutError past it)."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._events, timeout):
                    raise TimeoutError(f"no engine event within {timeout} s")
                ev = self._events.popleft()
            yield ev
            if ev.kind in ("done", "error"):
                return

    async def abatches(self) -> AsyncIterator[list[Event]]:
        """The events for an asyncio consumer (no thread blocked while waiting), each time all
        of those that arrived since the last wake-up: a consumer that falls behind takes several
        tokens at once. Ends after the batch holding "done" or "error"."""
        loop = asyncio.get_running_loop()
        aev = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, aev))
        try:
            while True:
                aev.clear()
                with self._cond:
                    batch = list(self._events)
                    self._events.clear()
                if not batch:
                    await aev.wait()
                    continue
                yield batch
                if batch[-1].kind in ("done", "error"):
                    return
        finally:
            with self._cond:
                self._waiters.remove((loop, aev))

    async def aevents(self) -> AsyncIterator[Event]:
        """`events` for an asyncio consumer, one event at a time."""
        async for batch in self.abatches():
            for ev in batch:
                yield ev

    def cancel(self) -> None:
        """Stop the request: its slot is freed at the next step; it ends with "cancelled"."""
        self.cancelled = True


# ----------------------------------------------------------------------------- image features
class LRU:
    """Values by key, least recently used first out, bounded in bytes (`size(value)`; default:
    device arrays or tuples of them): the image features (adapter outputs [Q, D] by image key),
    the prompt prefix blocks and the server's decoded images. Not locked."""

    def __init__(self, max_bytes: int, size=None):
        self.max_bytes = max_bytes
        self._size = size or _nbytes
        self.bytes = 0
        self._items: collections.OrderedDict = collections.OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._items

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        size = self._size(value)
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= self._size(old)


def _nbytes(value) -> int:
    return sum(a.nbytes for a in value) if isinstance(value, tuple) else value.nbytes


def _block_keys(ids: list[int], index: np.ndarray, images: list[ImageInput], n_queries: int,
                block: int) -> list[bytes]:  # fmt: skip
    """Key of each full `block`-token block of a prompt, chained (block j's key covers tokens
    0..(j+1)*block-1 and the images whose features fill them), so equal keys mean equal keys and
    values in the cache: those are causal, a function of the tokens and images before them."""
    out, h = [], hashlib.sha256()
    for j in range(len(ids) // block):
        h.update(np.asarray(ids[j * block : (j + 1) * block], np.int64).tobytes())
        idx = index[j * block : (j + 1) * block]
        for m in sorted(set((idx[idx >= 0] // n_queries).tolist())):
            h.update(images[m].key.encode())
        out.append(h.copy().digest())
    return out


# ----------------------------------------------------------------------------- the engine
def _pow2_at_least(n: int, low: int) -> int:
    b = low
    while b < n:
        b *= 2
    return b


def _chunk_bucket(n: int) -> int:
    """A prefill chunk's padded length: n rounded up to an eighth of the power of two above it
    (at least MIN_CHUNK), so padding wastes at most a quarter of a chunk (a 300-token prompt runs
    as 320, not 512) with four programs per octave."""
    step = max(MIN_CHUNK, _pow2_at_least(n, MIN_CHUNK) // 8)
    return -(-n // step) * step


@dataclasses.dataclass
class _Row:
    """A request in a slot."""

    handle: Handle
    ids: list[int]
    max_new: int
    features: jax.Array  # [1, K, D] the request's adapter outputs (zeros when it has no image)
    index: np.ndarray  # int32 [T] image_token_index of the prompt
    t_submit: float
    prefilled: int = 0  # prompt tokens in the cache
    blocks: list[bytes] = dataclasses.field(default_factory=list)  # `_block_keys` of the prompt
    kept: int = 0  # leading blocks already in (or offered to) the prefix cache
    generated: list[int] = dataclasses.field(default_factory=list)
    t_first: float | None = None

    @property
    def sampling(self) -> Sampling:
        return self.handle.request.sampling

    @property
    def ready(self) -> bool:
        """Decoding: the prompt is in the cache but its last token, which the next step feeds."""
        return self.prefilled >= len(self.ids) - 1


class Engine:
    """Serves `EngineRequest`s on a `QwenVL` with continuous batching (see the module docstring).

    Args:
      model: a loaded `qwenvl_jax.QwenVL` (its mesh, if any, shards the slot cache).
      max_batch: decode slots (rounded up to a multiple of data x fsdp on a mesh).
      max_seq_len: prompt + new tokens per request (the slot length).
      max_queue: waiting requests beyond which `submit` raises `QueueFull`.
      image_cache_mb: bound of the adapter-output cache, in MiB.
      prefill_chunk: the most prompt tokens prefilled per scheduler iteration (and per chunk).
      prefix_cache_mb: bound of the prompt-prefix cache, in MiB (0: off).
      decode_steps: decode steps per compiled call (one host round trip, one hand-off of
        `decode_steps` tokens per row; see the module docstring).
    """

    def __init__(self, model, *, max_batch: int = 8, max_seq_len: int = 2048,
                 max_queue: int = 256, image_cache_mb: float = 256.0,
                 prefill_chunk: int = 512, prefix_cache_mb: float = 256.0,
                 decode_steps: int = DECODE_STEPS):  # fmt: skip
        if min(max_batch, max_queue, prefill_chunk, decode_steps) < 1 or max_seq_len < 2:
            raise ValueError(
                f"max_batch ({max_batch}), max_queue ({max_queue}), prefill_chunk "
                f"({prefill_chunk}), decode_steps ({decode_steps}) must be >= 1 and max_seq_len "
                f"({max_seq_len}) >= 2"
            )
        self.decode_steps = decode_steps
        cfg = model.config
        if cfg.use_dynamic_ntk and max_seq_len > cfg.seq_length:
            raise ValueError(
                f"max_seq_len {max_seq_len} > the model's seq_length {cfg.seq_length}: longer "
                "prompts need a per-row dynamic-NTK alpha, which the engine does not compute"
            )
        self.model = model
        self.cfg = cfg
        mesh = model.mesh
        if mesh is not None:
            n = mesh.shape["data"] * mesh.shape["fsdp"]
            max_batch = -(-max_batch // n) * n
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.prefill_chunk = _pow2_at_least(prefill_chunk, MIN_CHUNK)
        self.eos = model.tokenizer.eod_id
        # Slot length: a bucket multiple that also holds the largest prefill chunk.
        self.cache_len = max(-(-max_seq_len // KV_BUCKET) * KV_BUCKET, self.prefill_chunk)
        self._kv_buckets = [b for b in (KV_BUCKET * 2**i for i in range(32)) if b < self.cache_len]
        self._kv_buckets.append(self.cache_len)
        graphdef, self._state = nnx.split(model.model)
        self._graphdef = _steps.Static(graphdef)
        self._use_logn = bool(cfg.use_logn_attn)
        # Decode steps run the first `rows` slots, a bucket holding every running row (requests
        # take the lowest free slot), so a lightly loaded engine does not compute empty slots.
        self._row_buckets = [b for b in (2**i for i in range(32)) if b < max_batch]
        self._row_buckets.append(max_batch)
        self._ctx = {b: None for b in self._row_buckets + [1]}
        if mesh is not None:
            for b in self._ctx:
                self._ctx[b] = gen_lib.ShardingContext(mesh, gen_lib.inference_rules(mesh, b))
        self._ctx1 = self._ctx[1]
        self._cache = None
        self._features = LRU(int(image_cache_mb * 2**20))
        self._prefixes = LRU(int(prefix_cache_mb * 2**20))
        self._programs: set = set()

        self._cond = threading.Condition()
        self._pending: collections.deque[Handle] = collections.deque()
        self._rows: list[_Row | None] = [None] * max_batch
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._wakeups = _Wakeups()
        self._stats = dict(tokens_generated=0, prompt_tokens=0, image_encodes=0,
                           image_cache_hits=0, requests_done=0,
                           prefix_tokens_reused=0)  # fmt: skip
        self._ttft: collections.deque[float] = collections.deque(maxlen=4096)
        self._tpot: collections.deque[float] = collections.deque(maxlen=4096)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Create the slot cache, compile the programs (logs their number), start the scheduler."""
        t0 = time.perf_counter()
        self._cache = gen_lib.make_cache(self.cfg, self.max_batch, self.cache_len,
                                         self.model.model.dtype, self.model.mesh)  # fmt: skip
        pcc = jax.config.jax_compilation_cache_dir
        self._warm_up()
        log.info(
            "engine: %d slots x %d positions, %d programs compiled in %.1f s (persistent "
            "compilation cache: %s)", self.max_batch, self.cache_len, len(self._programs),
            time.perf_counter() - t0, pcc or "not configured",
        )  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name="qwenvl-engine", daemon=True)
        self._thread.start()

    def submit(self, req: EngineRequest) -> Handle:
        """Queue a request. Raises QueueFull, PromptTooLong, or ValueError naming a bad field."""
        self._validate(req)
        handle = Handle(req, self._wakeups)
        handle._t_submit = time.perf_counter()
        with self._cond:
            if not self._accepting:
                raise QueueFull("the engine is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests (max_queue)")
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Take no more requests; finish the queued and running ones, cancel what is left after
        `grace_s` seconds; stop the scheduler."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._thread is not None and time.monotonic() < deadline:
            with self._cond:
                if not self._pending and not any(self._rows):
                    break
            time.sleep(0.01)
        with self._cond:
            for h in self._pending:
                h.cancel()
            for row in self._rows:
                if row is not None:
                    row.handle.cancel()
            if self._thread is None:  # never started: end the waiting requests here
                for h in self._pending:
                    h._push(Event("done", finish_reason="cancelled", usage=_usage(h, 0, None)))
                self._pending.clear()
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def stats(self) -> dict:
        """Counters and recent latency samples (seconds) for metrics."""
        with self._cond:
            out = dict(self._stats)
            out.update(
                queue=len(self._pending),
                running=sum(r is not None for r in self._rows),
                slots=self.max_batch,
                image_cache_bytes=self._features.bytes,
                prefix_cache_bytes=self._prefixes.bytes,
                n_compiled=len(self._programs),
                ttft=list(self._ttft),
                tpot=list(self._tpot),
            )
        return out

    # ------------------------------------------------------------------ checks
    def _validate(self, req: EngineRequest) -> None:
        ids, vocab = req.prompt_ids, self.cfg.vocab_size
        if not ids:
            raise ValueError("prompt_ids is empty")
        bad = [t for t in ids if not (isinstance(t, int | np.integer) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt_ids hold ids outside [0, {vocab}): {bad[:5]}")
        if len(ids) >= self.max_seq_len:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len} (prompt + at "
                f"least one new token)"
            )
        vis = self.cfg.visual
        _, counts = image_token_index(np.asarray(ids)[None], vis.image_start_id, vis.n_queries)
        if int(counts[0]) != len(req.images):
            raise ValueError(
                f"the prompt has {int(counts[0])} image spans but {len(req.images)} images "
                "were given"
            )
        s = vis.image_size
        for i, im in enumerate(req.images):
            if np.shape(im.pixels) != (s, s, 3):
                raise ValueError(
                    f"images[{i}].pixels has shape {np.shape(im.pixels)}, not {(s, s, 3)}"
                )
        sp = req.sampling
        if sp.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {sp.max_tokens}")
        if sp.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {sp.temperature}")
        if not 0 < sp.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {sp.top_p}")

    # ------------------------------------------------------------------ programs
    def _kv_len(self, n: int) -> int:
        return next(b for b in self._kv_buckets if b >= n)

    def _chunk_len(self, n: int) -> int:
        return min(_chunk_bucket(n), self.prefill_chunk)

    def _encode(self, pixels: np.ndarray) -> jax.Array:
        n = _pow2_at_least(len(pixels), 1)
        padded = np.zeros((n,) + pixels.shape[1:], np.float32)
        padded[: len(pixels)] = pixels
        self._programs.add(("encode", n))
        feats = _steps.encode_images(self._graphdef, self._state, padded, ctx=self._ctx1)
        return feats[: len(pixels)]

    def _prefill(self, slot, ids, seg, start, features, index, kv_len) -> None:
        self._programs.add(("prefill", ids.shape[1], kv_len, features.shape[1]))
        self._cache = _steps.prefill_chunk(
            self._graphdef, self._state, self._cache, np.int32(slot), ids, seg, np.int32(start),
            features, index, kv_len=kv_len, use_logn=self._use_logn, ctx=self._ctx1,
        )  # fmt: skip

    def _step(self, tokens, positions, active, sampling, steps, kv_len):
        """[decode_steps, rows] new tokens."""
        rows = len(tokens)
        self._programs.add(("decode", rows, kv_len))
        nxt, self._cache = _steps.decode_step(
            self._graphdef, self._state, self._cache, tokens, positions, active, sampling, steps,
            kv_len=kv_len, use_logn=self._use_logn, ctx=self._ctx[rows],
            n_steps=self.decode_steps,
        )  # fmt: skip
        return nxt

    def _warm_up(self) -> None:
        """Compile the decode step of every row x attended-length bucket and the prefill of every
        chunk bucket at the start of a slot (with one image's features); run them once."""
        q, d = self.cfg.visual.n_queries, self.cfg.hidden_size
        for b in self._row_buckets:
            off = np.full(b, self.cache_len, np.int32)  # every write dropped
            zeros = np.zeros(b, np.int32)
            samp_b = (np.zeros(b, np.float32), np.ones(b, np.float32), zeros)
            for kv in self._kv_buckets:
                self._step(zeros, off, np.zeros(b, bool), samp_b, zeros, kv).block_until_ready()
        feats = jnp.zeros((1, q, d), self.model.model.dtype)
        for t in sorted({self._chunk_len(n) for n in range(1, self.prefill_chunk + 1)}):
            ids = np.zeros((1, t), np.int32)
            index = np.full((1, t), -1, np.int32)
            self._prefill(0, ids, ids, 0, feats, index, self._kv_len(t))
        s = self.cfg.visual.image_size
        self._encode(np.zeros((1, s, s, 3), np.float32)).block_until_ready()
        if self._prefixes.max_bytes > 0:  # the prefix cache's two programs
            zero = np.int32(0)
            mesh = self.model.mesh
            k, v = _steps.read_block(self._cache, zero, zero, size=PREFIX_BLOCK, mesh=mesh)
            self._cache = _steps.write_block(self._cache, zero, zero, k, v, mesh=mesh)
            self._programs.update({("read_block", PREFIX_BLOCK), ("write_block", PREFIX_BLOCK)})

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    break
                busy = self._pending or any(self._rows)
                if not busy:
                    self._cond.wait(timeout=0.05)
                    continue
            try:
                self._iteration()
            except Exception as e:  # the step's rows fail; the engine and the queue go on
                log.exception("engine step failed")
                self._fail_running(f"{type(e).__name__}: {e}")
        self._end_all("cancelled")

    def _iteration(self) -> None:
        self._wakeups.collecting()
        try:
            self._admit()
            self._reap_cancelled()
            self._prefill_some()
            self._decode_once()
        finally:
            self._wakeups.flush()

    def _admit(self) -> None:
        admitted: list[tuple[int, Handle]] = []
        with self._cond:
            free = [i for i, r in enumerate(self._rows) if r is None]
            while free and self._pending:
                h = self._pending.popleft()
                if h.cancelled:
                    h._push(Event("done", finish_reason="cancelled", usage=_usage(h, 0, None)))
                    continue
                admitted.append((free.pop(0), h))
        if not admitted:
            return
        # The admitted requests' images: cached ones reused, the others encoded in one batch.
        need: dict[str, np.ndarray] = {}
        found: dict[str, jax.Array] = {}
        for _, h in admitted:
            for im in h.request.images:
                if im.key in found or im.key in need:
                    continue
                feats = self._features.get(im.key)
                if feats is None:
                    need[im.key] = np.asarray(im.pixels, np.float32)
                else:
                    found[im.key] = feats
        hits = sum(len(h.request.images) for _, h in admitted) - len(need)
        if need:
            encoded = self._encode(np.stack(list(need.values())))
            for i, key in enumerate(need):
                found[key] = encoded[i]
                self._features.put(key, encoded[i])
        q, d = self.cfg.visual.n_queries, self.cfg.hidden_size
        vis = self.cfg.visual
        for slot, h in admitted:
            req = h.request
            m = _pow2_at_least(max(len(req.images), 1), 1)
            feats = [found[im.key] for im in req.images]
            feats += [jnp.zeros((q, d), self.model.model.dtype)] * (m - len(feats))
            index, _ = image_token_index(np.asarray(req.prompt_ids)[None], vis.image_start_id, q)
            max_new = min(req.sampling.max_tokens, self.max_seq_len - len(req.prompt_ids))
            row = _Row(h, list(map(int, req.prompt_ids)), max_new,
                       jnp.concatenate(feats)[None], index[0], h._t_submit)  # fmt: skip
            reused = self._reuse_prefix(slot, row, req.images)
            with self._cond:
                self._rows[slot] = row
                self._stats["prefix_tokens_reused"] += reused
        with self._cond:
            self._stats["image_encodes"] += len(need)
            self._stats["image_cache_hits"] += hits

    def _reuse_prefix(self, slot: int, row: _Row, images: list[ImageInput]) -> int:
        """Writes the longest cached prefix of the row's prompt into its slot (whole blocks, and
        never the last prompt token, whose logits give the first new token); returns its length."""
        if self._prefixes.max_bytes <= 0:
            return 0
        q = self.cfg.visual.n_queries
        row.blocks = _block_keys(row.ids, row.index, images, q, PREFIX_BLOCK)
        found = []
        for key in row.blocks[: (len(row.ids) - 1) // PREFIX_BLOCK]:
            kv = self._prefixes.get(key)
            if kv is None:
                break
            found.append(kv)
        for j, (k, v) in enumerate(found):
            at = np.int32(j * PREFIX_BLOCK)
            self._cache = _steps.write_block(self._cache, np.int32(slot), at, k, v,
                                             mesh=self.model.mesh)  # fmt: skip
        row.kept = len(found)
        row.prefilled = len(found) * PREFIX_BLOCK
        return row.prefilled

    def _keep_prefix(self, slot: int, row: _Row) -> None:
        """Offers the row's newly prefilled whole blocks to the prefix cache."""
        if self._prefixes.max_bytes <= 0:
            return
        done = min(row.prefilled // PREFIX_BLOCK, len(row.blocks))
        for j in range(row.kept, done):
            if row.blocks[j] not in self._prefixes:
                kv = _steps.read_block(self._cache, np.int32(slot), np.int32(j * PREFIX_BLOCK),
                                       size=PREFIX_BLOCK, mesh=self.model.mesh)  # fmt: skip
                self._prefixes.put(row.blocks[j], kv)
        row.kept = max(row.kept, done)

    def _reap_cancelled(self) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None and row.handle.cancelled:
                self._finish(slot, "cancelled")

    def _prefill_some(self) -> None:
        """Prefill chunks, oldest request first, until `prefill_chunk` tokens are spent. A row's
        prompt is prefilled up to its last token (`_Row.ready`), which its first decode step
        feeds."""
        budget = self.prefill_chunk
        waiting = [s for s, r in enumerate(self._rows) if r is not None and not r.ready]
        waiting.sort(key=lambda s: self._rows[s].t_submit)
        for slot in waiting:
            row = self._rows[slot]
            target = len(row.ids) - 1
            while budget > 0 and row.prefilled < target:
                n = min(target - row.prefilled, self.prefill_chunk)
                t = self._chunk_len(n)
                # A chunk that would run past the slot starts earlier, recomputing cached tokens
                # at their own positions (same keys and values), so every chunk is a bucket.
                start = min(row.prefilled, self.cache_len - t)
                end = row.prefilled + n
                ids = np.zeros((1, t), np.int32)
                seg = np.zeros((1, t), np.int32)
                index = np.full((1, t), -1, np.int32)
                ids[0, : end - start] = row.ids[start:end]
                seg[0, : end - start] = 1
                index[0, : end - start] = row.index[start:end]
                try:
                    self._prefill(slot, ids, seg, start, row.features, index,
                                  self._kv_len(start + t))  # fmt: skip
                except Exception as e:  # this request's failure: the others go on
                    log.exception("prefill failed")
                    self._finish(slot, "error", f"{type(e).__name__}: {e}")
                    break
                budget -= n
                row.prefilled = end
                self._keep_prefix(slot, row)
            if budget <= 0:
                break

    def _decode_once(self) -> None:
        rows = [(s, r) for s, r in enumerate(self._rows) if r is not None and r.ready]
        if not rows:
            return
        b = next(n for n in self._row_buckets if n > rows[-1][0])
        tokens = np.zeros(b, np.int32)
        positions = np.full(b, self.cache_len, np.int32)  # not decoding: the write is dropped
        active = np.zeros(b, bool)
        temp, top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
        seed, steps = np.zeros(b, np.int32), np.zeros(b, np.int32)
        for s, r in rows:
            tokens[s] = r.generated[-1] if r.generated else r.ids[-1]
            positions[s] = len(r.ids) + len(r.generated) - 1
            active[s] = True
            temp[s], top_p[s] = r.sampling.temperature, r.sampling.top_p
            seed[s], steps[s] = r.sampling.seed or 0, len(r.generated)
        # The last step writes at position + decode_steps - 1; a row that would pass the cache
        # has ended by then (its length), and its later tokens are dropped below.
        last = int(positions[active].max()) + self.decode_steps
        kv = self._kv_len(min(last, self.cache_len))
        nxt = np.asarray(self._step(tokens, positions, active, (temp, top_p, seed), steps, kv))
        for step in nxt.tolist():
            for s, r in rows:
                if self._rows[s] is r:  # still running: not ended by an earlier step's token
                    self._accept(s, step[s])

    def _accept(self, slot: int, token: int) -> None:
        """The row's next token, after its stop sequences (as generate's StopWordsLogitsProcessor:
        a sequence that ends with one gets eos), emitted; the row finishes on eos or its limit."""
        row = self._rows[slot]
        for stop in row.sampling.stop_ids:
            if stop and _ends_with(row.ids, row.generated, stop):
                token = self.eos
                break
        if row.t_first is None:
            row.t_first = time.perf_counter()
            with self._cond:
                self._stats["prompt_tokens"] += len(row.ids)
        row.generated.append(token)
        row.handle._push(Event("token", token=token))
        if token == self.eos:
            self._finish(slot, "stop")
        elif len(row.generated) >= row.max_new:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str, message: str | None = None) -> None:
        row = self._rows[slot]
        n = len(row.generated)
        ttft = None if row.t_first is None else row.t_first - row.t_submit
        with self._cond:
            self._rows[slot] = None
            self._stats["tokens_generated"] += n
            self._stats["requests_done"] += 1
            if ttft is not None:
                self._ttft.append(ttft)
            if n > 1:
                self._tpot.append((time.perf_counter() - row.t_first) / (n - 1))
        if reason == "error":
            row.handle._push(Event("error", finish_reason="error", message=message))
        else:
            row.handle._push(Event("done", finish_reason=reason, usage=_usage(row.handle, n, ttft)))

    def _fail_running(self, message: str) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._finish(slot, "error", message)
        # The failed step may have consumed the donated cache: start from a fresh one.
        self._cache = gen_lib.make_cache(self.cfg, self.max_batch, self.cache_len,
                                         self.model.model.dtype, self.model.mesh)  # fmt: skip

    def _end_all(self, reason: str) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._finish(slot, reason)
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for h in pending:
            h._push(Event("done", finish_reason=reason, usage=_usage(h, 0, None)))


def _ends_with(ids: list[int], generated: list[int], stop: tuple[int, ...]) -> bool:
    """Whether ids + generated ends with `stop`, without building the sequence (per row and
    token on the scheduler thread)."""
    n, g = len(stop), len(generated)
    if n <= g:
        return tuple(generated[g - n :]) == tuple(stop)
    if n > g + len(ids):
        return False
    return tuple(ids[len(ids) - (n - g) :]) + tuple(generated) == tuple(stop)


def _usage(h: Handle, n: int, ttft: float | None) -> dict:
    return {"prompt_tokens": len(h.request.prompt_ids), "completion_tokens": n, "ttft_s": ttft}
