"""The serving engine on the tiny random HF checkpoint: its answers against `QwenVL.generate`."""

import hashlib
import os
import threading
import time

import numpy as np
import pytest
from reference_weights import REF

from qwenvl_jax import QwenVL
from qwenvl_jax import image as image_lib
from qwenvl_jax.serve.engine import (
    Engine,
    EngineRequest,
    Handle,
    ImageInput,
    PromptTooLong,
    QueueFull,
    Sampling,
)

MAX_SEQ = 384
CHUNK = 64


@pytest.fixture(scope="module")
def qwen(hf_dir):
    return QwenVL.from_pretrained(hf_dir, dtype="float32")


@pytest.fixture(scope="module")
def engine(qwen):
    eng = Engine(qwen, max_batch=4, max_seq_len=MAX_SEQ, max_queue=64, prefill_chunk=CHUNK)
    eng.start()
    yield eng
    eng.shutdown(grace_s=5)


def _image(name):
    path = os.path.join(REF, name)
    with open(path, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()
    pixels = image_lib.load_images([path], 56)[0]
    return path, ImageInput(key, pixels)


def _prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 150000, n)]


def _collect(handle, timeout=120):
    toks, done = [], None
    for ev in handle.events(timeout=timeout):
        if ev.kind == "token":
            toks.append(ev.token)
        else:
            done = ev
    return toks, done


def _run(engine, ids, images=(), **sampling):
    return _collect(engine.submit(EngineRequest(list(ids), list(images), Sampling(**sampling))))


def test_greedy_text_equals_generate(qwen, engine):
    ids = _prompt(0, 37)
    want = qwen.generate(ids, max_new_tokens=12)
    got, done = _run(engine, ids, max_tokens=12)
    assert got == want
    assert done.finish_reason == ("stop" if want[-1] == qwen.tokenizer.eod_id else "length")
    assert done.usage["prompt_tokens"] == 37 and done.usage["completion_tokens"] == len(want)


def test_greedy_image_equals_generate(qwen, engine, monkeypatch):
    monkeypatch.chdir(REF)
    path, image = _image("img_a.png")
    text = "<img>img_a.png</img>Generate the caption in English:"
    want = qwen.generate(text, max_new_tokens=10)
    got, _ = _run(engine, qwen.tokenizer.encode(text), [image], max_tokens=10)
    assert got == want


def test_stop_ids_force_eos_as_generate(qwen, engine):
    ids = _prompt(1, 20)
    free = qwen.generate(ids, max_new_tokens=8)
    stop = [free[2]]  # the third greedy token: the next one must become eos
    want = qwen.generate(ids, max_new_tokens=8, stop_words_ids=[stop])
    got, done = _run(engine, ids, max_tokens=8, stop_ids=(tuple(stop),))
    assert got == want and got[-1] == qwen.tokenizer.eod_id and done.finish_reason == "stop"


def test_prompt_too_long_and_bad_requests(engine):
    with pytest.raises(PromptTooLong, match=f"{MAX_SEQ}.*max_seq_len is {MAX_SEQ}"):
        engine.submit(EngineRequest(_prompt(2, MAX_SEQ), [], Sampling()))
    with pytest.raises(ValueError, match="outside"):
        engine.submit(EngineRequest([1, -3], [], Sampling()))
    with pytest.raises(ValueError, match="1 image spans but 0 images"):
        engine.submit(EngineRequest([151857] + [0] * 256 + [151858], [], Sampling()))


def test_queue_full(qwen):
    eng = Engine(qwen, max_batch=1, max_seq_len=MAX_SEQ, max_queue=2)
    # Not started: nothing drains the queue, so the third request finds it full.
    hs = [eng.submit(EngineRequest(_prompt(3, 8), [], Sampling())) for _ in range(2)]
    with pytest.raises(QueueFull, match="max_queue"):
        eng.submit(EngineRequest(_prompt(3, 8), [], Sampling()))
    eng.shutdown(grace_s=0)
    assert [_collect(h)[1].finish_reason for h in hs] == ["cancelled", "cancelled"]


def test_cancel_ends_request(engine):
    h = engine.submit(EngineRequest(_prompt(4, 30), [], Sampling(max_tokens=400)))
    h.cancel()
    toks, done = _collect(h)
    assert done.finish_reason == "cancelled" and len(toks) < 400
    deadline = time.monotonic() + 30
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0
    # The engine still serves the next request.
    assert _run(engine, _prompt(5, 10), max_tokens=3)[1].finish_reason in ("stop", "length")


def test_async_events(engine):
    import asyncio

    async def go():
        h = engine.submit(EngineRequest(_prompt(6, 12), [], Sampling(max_tokens=4)))
        return [ev async for ev in h.aevents()]

    evs = asyncio.run(go())
    assert (
        evs[-1].kind == "done"
        and sum(e.kind == "token" for e in evs) == 4
        or (evs[-1].finish_reason == "stop")
    )


def test_concurrent_requests_equal_alone(engine):
    # 16 requests of different lengths (some longer than a prefill chunk) submitted at once into
    # 4 slots: each answer equals the same request served alone. Rows 3, 7, 11, 15 sample (their
    # draws depend on their own seed and step only); the others are greedy.
    def sampling(i):
        if i % 4 == 3:
            return Sampling(max_tokens=2 + i % 7, temperature=0.9, top_p=0.8, seed=i)
        return Sampling(max_tokens=2 + i % 7)

    reqs = [(_prompt(100 + i, 3 + 13 * i), sampling(i)) for i in range(16)]
    handles = [engine.submit(EngineRequest(p, [], sp)) for p, sp in reqs]
    together = [_collect(h)[0] for h in handles]
    alone = [_collect(engine.submit(EngineRequest(p, [], sp)))[0] for p, sp in reqs]
    assert together == alone
    greedy = _run(engine, reqs[3][0], max_tokens=reqs[3][1].max_tokens)[0]
    assert together[3] != greedy  # the sampled row did sample


def test_image_encoded_once_for_ten_requests(qwen, engine):
    _, image = _image("img_b.jpg")
    ids = qwen.tokenizer.encode("<img>img_b.jpg</img>What is it?")
    before = engine.stats()
    handles = [
        engine.submit(EngineRequest(ids, [image], Sampling(max_tokens=2))) for _ in range(10)
    ]
    outs = [_collect(h)[0] for h in handles]
    after = engine.stats()
    assert after["image_encodes"] - before["image_encodes"] == 1
    assert after["image_cache_hits"] - before["image_cache_hits"] == 9
    assert after["image_cache_bytes"] > 0
    assert all(o == outs[0] for o in outs)


def test_joining_request_does_not_stop_running_rows(qwen, engine, monkeypatch):
    # A decodes; B (a prompt of three prefill chunks) joins: A keeps getting tokens between B's
    # chunks (the engine's pushes are logged as they happen), and neither answer changes.
    a_ids, b_ids = _prompt(20, 10), _prompt(21, 3 * CHUNK - 5)
    a_alone = _run(engine, a_ids, max_tokens=40)[0]
    b_alone = qwen.generate(b_ids, max_new_tokens=3)  # not the engine: B's blocks stay uncached
    pushes = []
    push = Handle._push

    def logged(self, ev):
        pushes.append((self, ev.kind))
        push(self, ev)

    monkeypatch.setattr(Handle, "_push", logged)
    ha = engine.submit(EngineRequest(a_ids, [], Sampling(max_tokens=40)))
    it = ha.events(timeout=120)
    a_out = [next(it).token for _ in range(3)]  # A is decoding
    hb = engine.submit(EngineRequest(b_ids, [], Sampling(max_tokens=3)))
    mark = len(pushes)
    a_out += [ev.token for ev in it if ev.kind == "token"]
    b_out = [ev.token for ev in hb.events(timeout=120) if ev.kind == "token"]
    assert a_out == a_alone and b_out == b_alone
    after = pushes[mark:]
    b_first = next(i for i, (h, kind) in enumerate(after) if h is hb)
    assert sum(h is ha and kind == "token" for h, kind in after[:b_first]) >= 2


def test_cancel_frees_slot_for_waiting_request(engine):
    # Every slot busy with a long request, one more waiting: cancelling one running request
    # lets the waiting one in and through while the others still run.
    running = [engine.submit(EngineRequest(_prompt(30 + i, 8), [], Sampling(max_tokens=400)))
               for i in range(engine.max_batch)]  # fmt: skip
    waiting = engine.submit(EngineRequest(_prompt(40, 8), [], Sampling(max_tokens=2)))
    for h in running:
        next(h.events(timeout=60))  # each holds a slot
    assert engine.stats()["queue"] == 1 and engine.stats()["running"] == engine.max_batch
    running[0].cancel()
    assert _collect(running[0])[1].finish_reason == "cancelled"
    assert _collect(waiting)[1].finish_reason in ("stop", "length")
    assert not any(h.finished for h in running[1:])
    for h in running[1:]:
        h.cancel()
        assert _collect(h)[1].finish_reason == "cancelled"
    assert engine.stats()["n_compiled"] > 0


def test_threads_submit_concurrently(engine):
    results = {}

    def worker(i):
        results[i] = _run(engine, _prompt(10 + i, 5 + 7 * i), max_tokens=3 + i)[0]

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(4):
        assert results[i] == _run(engine, _prompt(10 + i, 5 + 7 * i), max_tokens=3 + i)[0]


def test_prefix_blocks_reused_with_the_same_answer(qwen, engine, monkeypatch):
    # The same prompt with an image again: its whole leading blocks come from the prefix cache and
    # the answer still equals generate; the same ids with another image reuse nothing (the blocks
    # hold the image's features).
    monkeypatch.chdir(REF)
    text = "Picture 1: <img>img_a.png</img>Which colour is the square, in one word?"
    ids = qwen.tokenizer.encode(text)
    want = qwen.generate(text, max_new_tokens=6)
    _, img_a = _image("img_a.png")
    _, img_b = _image("img_b.jpg")
    reused = []
    outs = []
    for image in (img_a, img_a, img_b):
        before = engine.stats()["prefix_tokens_reused"]
        outs.append(_run(engine, ids, [image], max_tokens=6)[0])
        reused.append(engine.stats()["prefix_tokens_reused"] - before)
    assert outs[0] == want and outs[1] == want
    assert reused == [0, (len(ids) - 1) // 64 * 64, 0] and reused[1] >= 256
    assert engine.stats()["prefix_cache_bytes"] > 0
