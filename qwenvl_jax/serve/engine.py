"""The serving engine: requests in, token events out (first version: one request at a time).

This first version serves requests one at a time through `qwenvl_jax.generate.generate` (the
library's prefill + on-device decode loop), behind the interface the HTTP layer codes against;
continuous batching replaces the scheduler's inside without changing that interface.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator

import jax
import numpy as np

from qwenvl_jax import generate as gen_lib
from qwenvl_jax.tokenizer import image_token_index

log = logging.getLogger(__name__)


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


class Handle:
    """One submitted request: its events (blocking or async) and `cancel`."""

    def __init__(self, req: EngineRequest):
        self.request = req
        self._events: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
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

    async def aevents(self) -> AsyncIterator[Event]:
        """`events` for an asyncio consumer (no thread blocked while waiting)."""
        loop = asyncio.get_running_loop()
        aev = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, aev))
        try:
            while True:
                aev.clear()
                with self._cond:
                    ev = self._events.popleft() if self._events else None
                if ev is None:
                    await aev.wait()
                    continue
                yield ev
                if ev.kind in ("done", "error"):
                    return
        finally:
            with self._cond:
                self._waiters.remove((loop, aev))

    def cancel(self) -> None:
        """Stop the request: its slot is freed at the next step; it ends with "cancelled"."""
        self.cancelled = True


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Serves `EngineRequest`s on a `QwenVL` from one scheduler thread.

    Args:
      model: a loaded `qwenvl_jax.QwenVL` (its mesh, if any, is used).
      max_batch: decode slots. max_seq_len: prompt + new tokens per request.
      max_queue: requests waiting beyond that raise `QueueFull`.
      image_cache_mb: size bound of the image-feature cache.
      prefill_chunk: the longest prefill piece.
    """

    def __init__(self, model, *, max_batch: int = 8, max_seq_len: int = 2048,
                 max_queue: int = 256, image_cache_mb: float = 256.0,
                 prefill_chunk: int = 512):  # fmt: skip
        if max_batch < 1 or max_seq_len < 2 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError(
                f"max_batch ({max_batch}), max_queue ({max_queue}), prefill_chunk "
                f"({prefill_chunk}) must be >= 1 and max_seq_len ({max_seq_len}) >= 2"
            )
        self.model = model
        self.cfg = model.config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.image_cache_mb = image_cache_mb
        self.prefill_chunk = prefill_chunk
        self.eos = model.tokenizer.eod_id
        self._queue: queue.Queue[Handle] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._running = 0
        self._stats = dict(tokens_generated=0, prompt_tokens=0, image_encodes=0,
                           image_cache_hits=0, image_cache_bytes=0, n_compiled=0)  # fmt: skip
        self._ttft: collections.deque[float] = collections.deque(maxlen=1024)
        self._tpot: collections.deque[float] = collections.deque(maxlen=1024)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Warm up (one request through the model) and start the scheduler thread."""
        t0 = time.perf_counter()
        gen_lib.generate(self.model.model, [self.eos], max_new_tokens=1, mesh=self.model.mesh)
        log.info("engine warm-up took %.1f s", time.perf_counter() - t0)
        self._thread = threading.Thread(target=self._loop, name="qwenvl-engine", daemon=True)
        self._thread.start()

    def submit(self, req: EngineRequest) -> Handle:
        """Queue a request. Raises QueueFull, PromptTooLong, or ValueError naming a bad field."""
        if not self._accepting:
            raise QueueFull("the engine is shutting down")
        self._validate(req)
        handle = Handle(req)
        with self._lock:
            if self._queue.qsize() >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests (max_queue)")
            self._queue.put(handle)
        return handle

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Take no more requests; finish the queued and running ones, cancel what is left after
        `grace_s` seconds."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while (self._queue.qsize() or self._running) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, grace_s))
        while True:
            try:
                h = self._queue.get_nowait()
            except queue.Empty:
                break
            h._push(Event("done", finish_reason="cancelled", usage=self._usage(h, 0, None)))

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._stats)
            out.update(
                queue=self._queue.qsize(),
                running=self._running,
                slots=self.max_batch,
                ttft=list(self._ttft),
                tpot=list(self._tpot),
            )
        return out

    # ------------------------------------------------------------------ checks
    def _validate(self, req: EngineRequest) -> None:
        ids = req.prompt_ids
        if not ids:
            raise ValueError("prompt_ids is empty")
        bad = [
            t for t in ids if not (isinstance(t, int | np.integer) and 0 <= t < self.cfg.vocab_size)
        ]
        if bad:
            raise ValueError(f"prompt_ids hold ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_seq_len:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len} (prompt + at "
                f"least one new token)"
            )
        _, counts = image_token_index(
            np.asarray(ids, np.int64)[None],
            self.cfg.visual.image_start_id,
            self.cfg.visual.n_queries,
        )
        if int(counts[0]) != len(req.images):
            raise ValueError(
                f"the prompt has {int(counts[0])} image spans but {len(req.images)} images "
                "were given"
            )
        s = self.cfg.visual.image_size
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

    def _usage(self, h: Handle, n: int, ttft: float | None) -> dict:
        return {"prompt_tokens": len(h.request.prompt_ids), "completion_tokens": n, "ttft_s": ttft}

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                h = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if h.cancelled:
                h._push(Event("done", finish_reason="cancelled", usage=self._usage(h, 0, None)))
                continue
            with self._lock:
                self._running = 1
            try:
                self._serve_one(h)
            except Exception as e:  # one request's failure must not stop the engine
                log.exception("request failed")
                h._push(Event("error", finish_reason="error", message=f"{type(e).__name__}: {e}"))
            finally:
                with self._lock:
                    self._running = 0

    def _serve_one(self, h: Handle) -> None:
        req, sp = h.request, h.request.sampling
        t0 = time.perf_counter()
        max_new = min(sp.max_tokens, self.max_seq_len - len(req.prompt_ids))
        images = None
        if req.images:
            images = np.stack([np.asarray(im.pixels, np.float32) for im in req.images])
        out = gen_lib.generate(
            self.model.model,
            list(map(int, req.prompt_ids)),
            images=images,
            max_new_tokens=max_new,
            do_sample=sp.temperature > 0,
            temperature=sp.temperature if sp.temperature > 0 else 1.0,
            top_p=sp.top_p,
            stop_words_ids=[list(s) for s in sp.stop_ids],
            eos_token_id=self.eos,
            rng=jax.random.key(sp.seed or 0),
            mesh=self.model.mesh,
        )
        ttft = time.perf_counter() - t0
        with self._lock:
            self._stats["prompt_tokens"] += len(req.prompt_ids)
            self._stats["tokens_generated"] += len(out)
            self._stats["image_encodes"] += len(req.images)
            self._ttft.append(ttft)
        n = 0
        for tok in out:
            if h.cancelled:
                h._push(Event("done", finish_reason="cancelled", usage=self._usage(h, n, ttft)))
                return
            h._push(Event("token", token=int(tok)))
            n += 1
        reason = "stop" if out and out[-1] == self.eos else "length"
        h._push(Event("done", finish_reason=reason, usage=self._usage(h, n, ttft)))
