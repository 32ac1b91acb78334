"""The HTTP server on the tiny random HF checkpoint, through the real `openai` client and raw HTTP.

One uvicorn server per module (a thread of this process, a free port on 127.0.0.1), sharing the
loaded model with the references it is checked against (`QwenVL.chat`'s prompt and generation,
`QwenVL.generate`).
"""

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import signal
import time

import httpx
import openai
import pytest
from PIL import Image
from ports import free_port
from reference_weights import REF

from qwenvl_jax import QwenVL
from qwenvl_jax import chat as chat_lib
from qwenvl_jax.serve import app as app_lib
from qwenvl_jax.serve.app import ServerConfig, create_app
from qwenvl_jax.serve.engine import Engine
from qwenvl_jax.serve.images import ImageLimits
from qwenvl_jax.serve.server import BackgroundServer

MAX_SEQ = 512
NAME = "tiny-vl"
IMG = os.path.join(REF, "img_a.png")
with open(IMG, "rb") as _f:
    IMG_BYTES = _f.read()
DATA_URL = "data:image/png;base64," + base64.b64encode(IMG_BYTES).decode()
LABEL = hashlib.sha256(IMG_BYTES).hexdigest()[:16]  # the span label the server writes


@pytest.fixture(scope="module")
def qwen(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    shutil.copy(IMG, root / LABEL)  # the references read the image under the server's label
    shutil.copy(IMG, root / "a.png")
    model = QwenVL.from_pretrained(hf_dir, dtype="float32")
    model.image_root = str(root)
    return model


@pytest.fixture(scope="module")
def server(qwen):
    engine = Engine(qwen, max_batch=4, max_seq_len=MAX_SEQ, max_queue=16, prefill_chunk=128)
    engine.start()
    limits = ImageLimits(allowed_local_dir=qwen.image_root)
    app = create_app(engine, ServerConfig(NAME, MAX_SEQ, limits=limits, max_images=2))
    srv = BackgroundServer(app, port=free_port()).start()
    srv.engine = engine
    yield srv
    srv.stop()
    engine.shutdown(grace_s=5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _image_message(text="What is this?", url=DATA_URL):
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def _cut(tok, new, stops):
    """New ids up to the first stop id or eos: the answer's tokens."""
    for i, t in enumerate(new):
        if t == tok.eod_id or [t] in stops:
            return new[:i]
    return new


def test_chat_with_data_image_equals_qwenvl_chat(server, client, qwen):
    r = client.chat.completions.create(
        model=NAME, messages=_image_message(), max_tokens=6, temperature=0
    )
    # QwenVL.chat's prompt and generation (chat_batch: make_context, ChatML stops, greedy).
    query = chat_lib.from_list_format([{"image": LABEL}, {"text": "What is this?"}])
    raw, context = chat_lib.make_context(qwen.tokenizer, query)
    stops = chat_lib.stop_words_ids(qwen.tokenizer)
    new = qwen.generate_batch([context], stop_words_ids=stops, max_new_tokens=6)[0]
    assert r.usage.prompt_tokens == len(context)
    assert r.usage.completion_tokens == len(new)
    assert (
        r.choices[0].message.content
        == qwen.tokenizer.decode(_cut(qwen.tokenizer, new, stops)).strip()
    )
    assert r.choices[0].finish_reason == (
        "length" if len(new) == 6 and new[-1] != qwen.tokenizer.eod_id else "stop"
    )
    assert r.choices[0].message.grounding == []  # the field is there (no box in this answer)


def test_stream_equals_non_stream(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_completion_with_image_equals_generate(client, qwen):
    prompt = "<img>{}</img>Generate the caption in English:"
    r = client.completions.create(model=NAME, prompt=prompt.format(DATA_URL), max_tokens=5)
    new = qwen.generate(prompt.format(LABEL), max_new_tokens=5)
    assert r.usage.prompt_tokens == len(qwen.tokenizer.encode(prompt.format(LABEL)))
    assert r.usage.completion_tokens == len(new)
    assert r.choices[0].text == qwen.tokenizer.decode(_cut(qwen.tokenizer, new, []))
    # A local path inside --allowed_local_dir gives the same answer (same bytes, same label).
    r2 = client.completions.create(model=NAME, prompt=prompt.format("a.png"), max_tokens=5)
    assert r2.choices[0].text == r.choices[0].text


def test_stop_string_cuts_the_answer(client):
    kw = dict(model=NAME, prompt="The", max_tokens=12)
    text = client.completions.create(**kw).choices[0].text
    stop = text[4:6]
    cut = text[: text.find(stop)]
    r = client.completions.create(**kw, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**kw, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == cut


def test_grounding_boxes_in_pixels():
    from qwenvl_jax.serve.images import LoadedImage
    from qwenvl_jax.serve.prompt import Prompt

    prompt = Prompt("", [], [LoadedImage(None, 10, 10), LoadedImage(None, 640, 480)], (), True)
    text = "It is <ref>a dog</ref><box>(100,200),(500,750)</box> here."
    (box,) = app_lib._boxes(text, prompt)
    # The last image's 640x480 pixels: x * 640 / 1000, y * 480 / 1000.
    assert box == {
        "ref": "a dog",
        "kind": "box",
        "coords": (100, 200, 500, 750),
        "pixels": (64, 96, 320, 360),
    }


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "qwenvl_queue_length",
        "qwenvl_running_rows",
        "qwenvl_generation_tokens_per_second",
        "qwenvl_time_to_first_token_seconds_bucket",
        "qwenvl_time_per_output_token_seconds_bucket",
        "qwenvl_image_cache_hits_total",
    ):
        assert name in text


def _png(size, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(**kw):
    return {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


def _img(url):
    return _chat(messages=_image_message(url=url))


# (id, endpoint or (method, path), body (dict, or raw bytes), status, words in the message)
BAD = [
    ("malformed_json", "chat", b'{"model": "tiny-vl", "messages": [', 400, "not valid JSON"),
    ("not_an_object", "chat", b"[1, 2]", 400, "must be a JSON object"),
    ("missing_messages", "chat", {"model": NAME}, 400, "messages: field required"),
    ("empty_messages", "chat", _chat(messages=[]), 400, "messages:"),
    ("unknown_field", "chat", _chat(logprobs=True), 400, "logprobs: unknown field"),
    ("unknown_model", "chat", _chat(model="gpt-4o"), 404, "'gpt-4o' does not exist"),
    (
        "missing_model",
        "chat",
        {"messages": [{"role": "user", "content": "Hi"}]},
        400,
        "model: field required",
    ),
    (
        "bad_role",
        "chat",
        _chat(messages=[{"role": "robot", "content": "Hi"}]),
        400,
        "messages[0].role",
    ),
    (
        "unknown_part",
        "chat",
        _chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
        400,
        "messages[0].content",
    ),
    (
        "image_without_url",
        "chat",
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "image_url.url: field required",
    ),
    ("bad_base64", "chat", _img("data:image/png;base64,iVBOR%%%"), 400, "invalid base64"),
    ("data_url_not_base64", "chat", _img("data:image/png,abc"), 400, "only base64 data URLs"),
    (
        "data_not_an_image",
        "chat",
        _img("data:image/png;base64," + base64.b64encode(b"hello world").decode()),
        400,
        "are not an image",
    ),
    ("url_not_an_image", "chat", _img("{url}/health"), 400, "are not an image"),
    ("url_404", "chat", _img("{url}/no/such/image.png"), 400, "answered HTTP 404"),
    ("url_unreachable", "chat", _img("http://127.0.0.1:{dead}/a.png"), 400, "could not fetch"),
    (
        "decompression_bomb",
        "chat",
        _img(_png((8000, 8000), "1")),
        400,
        "64000000 pixels, more than the limit",
    ),
    (
        "too_many_images",
        "chat",
        _chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}] * 3,
                }
            ]
        ),
        400,
        "too many images; at most 2",
    ),
    ("path_outside_dir", "chat", _img("/etc/passwd"), 400, "outside the allowed directory"),
    (
        "img_tag_outside_dir",
        "chat",
        _chat(messages=[{"role": "user", "content": "<img>../../etc/passwd</img> what?"}]),
        400,
        "outside the allowed directory",
    ),
    ("missing_file", "chat", _img("file:nope.png"), 400, "image file not found"),
    ("ftp_url", "chat", _img("ftp://example.com/a.png"), 400, "unsupported URL scheme 'ftp'"),
    (
        "prompt_too_long",
        "chat",
        _chat(messages=[{"role": "user", "content": "hello " * 600}]),
        400,
        "messages: the prompt has",
    ),
    ("max_tokens_too_many", "chat", _chat(max_tokens=MAX_SEQ), 400, "max_tokens: the prompt has"),
    ("max_tokens_zero", "chat", _chat(max_tokens=0), 400, "max_tokens"),
    ("negative_temperature", "chat", _chat(temperature=-1), 400, "temperature"),
    ("top_p_zero", "chat", _chat(top_p=0), 400, "top_p"),
    ("n_two", "chat", _chat(n=2), 400, "n:"),
    ("five_stops", "chat", _chat(stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop strings"),
    ("stream_not_bool", "chat", _chat(stream="please"), 400, "stream"),
    (
        "last_not_user",
        "chat",
        _chat(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
        400,
        "the last message must be the user's",
    ),
    (
        "two_users",
        "chat",
        _chat(messages=[{"role": "user", "content": "Hi"}, {"role": "user", "content": "Yo"}]),
        400,
        "messages[1].role: expected 'assistant'",
    ),
    (
        "system_image",
        "chat",
        _chat(
            messages=[
                {
                    "role": "system",
                    "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}],
                },
                {"role": "user", "content": "Hi"},
            ]
        ),
        400,
        "system message holds text only",
    ),
    (
        "two_prompts",
        "completion",
        {"model": NAME, "prompt": ["a", "b"]},
        400,
        "one prompt per request",
    ),
    (
        "unclosed_img",
        "completion",
        {"model": NAME, "prompt": "<img>a.png what"},
        400,
        "<img> without its </img>",
    ),
    ("echo", "completion", {"model": NAME, "prompt": "a", "echo": True}, 400, "echo"),
    ("unknown_route", ("GET", "/v1/nothing"), None, 404, "/v1/nothing"),
    ("wrong_method", ("GET", "/v1/chat/completions"), None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("name,where,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_then_good_one(server, client, name, where, body, status, words):
    method, path = {"chat": ("POST", "/v1/chat/completions"),
                    "completion": ("POST", "/v1/completions")}.get(where, where)  # fmt: skip
    if isinstance(body, dict):
        dead = free_port()
        body = httpx.Request("POST", "/", json=body).content.replace(b"{url}", server.url.encode())
        body = body.replace(b"{dead}", str(dead).encode())
    r = httpx.request(method, server.url + path, content=body, timeout=60,
                      headers={"content-type": "application/json"})  # fmt: skip
    err = r.json()["error"]
    assert r.status_code == status, err
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"], err["message"]
    ok = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert ok.usage.completion_tokens >= 1


async def _open_streams(url, n, max_tokens):
    """n streaming requests opened at once; (statuses, responses kept open, client)."""
    client = httpx.AsyncClient(timeout=60)
    body = {"model": NAME, "prompt": "Once", "max_tokens": max_tokens, "stream": True}

    async def one():
        req = client.build_request("POST", url + "/v1/completions", json=body)
        return await client.send(req, stream=True)

    responses = await asyncio.gather(*(one() for _ in range(n)))
    return [r.status_code for r in responses], responses, client


def _wait_idle(engine, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["queue"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_queue_full_429_and_disconnect_frees_slots(server, client):
    async def scenario():
        # max_batch 4 + max_queue 16: of 24 long requests at once, some find the queue full.
        statuses, responses, http = await _open_streams(server.url, 24, 96)
        refused = [r for r in responses if r.status_code == 429]
        body = [await r.aread() for r in refused]
        # The accepted ones (running or queued) hang up: the clients go away.
        for r in responses:
            await r.aclose()
        await http.aclose()
        return statuses, body

    before = server.engine.stats()["tokens_generated"]
    statuses, bodies = asyncio.run(scenario())
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    assert b"queue" in bodies[0] and b"rate_limit_error" in bodies[0]
    assert _wait_idle(server.engine), server.engine.stats()  # every slot and queue place freed
    # Cancelled, not run to the end: far fewer tokens than the accepted requests asked for.
    generated = server.engine.stats()["tokens_generated"] - before
    assert generated < 96 * statuses.count(200) / 2, (generated, statuses.count(200))
    ok = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert ok.usage.completion_tokens >= 1


def test_shutdown_finishes_running_request_then_stops_listening(server):
    # A second app on the module's engine, stopped as SIGTERM stops `python -m qwenvl_jax.serve`.
    app = create_app(server.engine, ServerConfig(NAME, MAX_SEQ))
    srv = BackgroundServer(app, port=free_port()).start()
    body = {"model": NAME, "prompt": "Once", "max_tokens": 24, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        lines = (ln for ln in r.iter_lines() if ln)
        first = next(lines)  # the request is running
        srv.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        rest = list(lines)
    chunks = [json.loads(ln[6:]) for ln in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")  # finished, not cut
    srv.thread.join(timeout=30)
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.ConnectError):  # no longer listening
        httpx.get(srv.url + "/health", timeout=2)


def test_bench_serve_against_the_server(server):
    from qwenvl_jax.serve import bench as serve_bench

    r = serve_bench.run(server.url, "", NAME, 2, 2, 3, "", "", log=lambda line: None)
    for run in (r["concurrent"], r["sequential"]):
        assert run["errors"] == [] and run["requests"] == 2 and run["output_tokens_per_s"] > 0
    assert r["ratio"] == r["concurrent"]["requests_per_s"] / r["sequential"]["requests_per_s"]


def test_concurrent_requests_equal_each_served_alone(client):
    from concurrent.futures import ThreadPoolExecutor

    def ask(k):
        msgs = [{"role": "user", "content": "Count " + "and more " * k}]
        r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3 + k % 5)
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens

    alone = [ask(k) for k in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone
    assert len({a[1] for a in alone}) == 16  # 16 different prompt lengths


def _counter(server, name):
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_same_image_is_encoded_once(server, client):
    url = _png((33, 17))  # an image no other test sends
    before = [_counter(server, f"qwenvl_image_{k}_total") for k in ("encodes", "cache_hits")]
    for _ in range(4):
        client.chat.completions.create(model=NAME, messages=_image_message(url=url), max_tokens=1)
    after = [_counter(server, f"qwenvl_image_{k}_total") for k in ("encodes", "cache_hits")]
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)


def test_image_sent_again_is_not_decoded_again(server, client):
    # The second request's data: URL comes from the decoded-image cache (no base64, no PNG
    # decode); the answers are the same.
    decoded = server.server.config.app.state.decoded_images
    url = _png((29, 23))  # an image no other test sends
    before = decoded.hits
    answers = [
        client.chat.completions.create(model=NAME, messages=_image_message(url=url), max_tokens=3)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert decoded.hits - before == 1 and answers[0] == answers[1]


def test_stream_chunks_carry_several_tokens(client):
    # The engine hands each row its decode_steps tokens at once: one SSE chunk for them, which
    # the openai client parses like any other; the text equals the non-streamed answer.
    kw = dict(model=NAME, prompt="Once upon a", max_tokens=8)
    whole = client.completions.create(**kw)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(texts) < whole.usage.completion_tokens
