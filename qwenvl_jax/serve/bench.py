"""`python -m qwenvl_jax.bench --mode=serve`: the server under load, as vLLM bench serve measures.

    python -m qwenvl_jax.bench --mode=serve --checkpoint=DIR [--concurrency=32] [--num_requests=256]
    python -m qwenvl_jax.bench --mode=serve --url=http://127.0.0.1:8000 --model=NAME

Without --url the server is started here (`python -m qwenvl_jax.serve` in a subprocess on a free
loopback port, --server_flags passed on) and stopped at the end. The load is --num_requests
streamed chat requests built from (image, prompt) pairs: the images of --image_dir (or
synthetic ones of several sizes) cycled against a list of prompts. It runs twice in one
invocation, untimed warm-up first: with --concurrency clients at once, then one request at a time;
each prints requests/s, output tokens/s, TTFT and TPOT p50/p99, and the last line the ratio of
the two request rates. `--soak_s=300` then keeps the server saturated that long and samples its
resident memory (a leak shows as growth), ending with the queue and running rows (a slot leak
shows as running > 0).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

from qwenvl_jax.errors import ConfigError, MissingPathError

_URL = flags.DEFINE_string("url", "", "serve: an already running server (else one is started).")
_CKPT = flags.DEFINE_string("checkpoint", "", "serve: the checkpoint the started server loads.")
_RANDOM = flags.DEFINE_enum(
    "random_model", "", ["", "tiny", "tiny-d64"],
    "serve: instead of --checkpoint, a random checkpoint written to a temporary directory: tiny"
    " (the `tiny` preset, the tests' fixture: d=256, 2 layers, the real 151,936-token vocabulary)"
    " or tiny-d64 (the same at d=64, a ViT of width 32).",
)  # fmt: skip
_MODEL = flags.DEFINE_string("model", "", "serve: the served model name (default: the server's).")
_CONC = flags.DEFINE_integer("concurrency", 32, "serve: concurrent clients.")
_NREQ = flags.DEFINE_integer(
    "num_requests", 256,
    "serve: requests per run (at 32 clients, 8 each: fewer measure mostly the first wave's"
    " queueing and the last one's drain).",
)  # fmt: skip
_MAXTOK = flags.DEFINE_integer(
    "max_tokens", 110,
    "serve: max_tokens of each request (110: the answer length of the published TPU serving run"
    " docs/inference.md compares with; vLLM's bench serve draws 128 by default).",
)  # fmt: skip
_IMGDIR = flags.DEFINE_string("image_dir", "", "serve: images to send (default: synthetic).")
_SOAK = flags.DEFINE_integer(
    "soak_s", 0, "serve: then this many seconds at saturation, the server's RSS sampled."
)
_LONG = flags.DEFINE_integer(
    "long_prompt", 0,
    "serve: then a prompt of about this many tokens arrives while --concurrency rows decode; the"
    " rows' time between streamed chunks while it is prefilled (its chunks) is printed.",
)  # fmt: skip
_START_S = flags.DEFINE_integer(
    "server_start_s", 600, "serve: how long the started server may take to answer /health."
)
_SFLAGS = flags.DEFINE_string(
    "server_flags", "", "serve: extra flags for the started server (e.g. '--max_seq_len=1024')."
)

PROMPTS = (
    "Describe this image.",
    "What is the main colour of the picture?",
    "Generate the caption in English with grounding:",
    "Is there any text in the image? Answer briefly.",
)


# Overrides of the `tiny` preset for --random_model.
RANDOM_MODELS = {
    "tiny": {},
    "tiny-d64": {"hidden_size": 64, "kv_channels": 16, "intermediate_size": 256,
                 "visual": {"output_dim": 64, "resampler_heads": 2, "width": 32}},
}  # fmt: skip


def write_random_checkpoint(name: str, out_dir: str) -> str:
    """A random checkpoint of `RANDOM_MODELS[name]` in the HF layout, in out_dir."""
    from flax import nnx

    from qwenvl_jax import config as config_lib
    from qwenvl_jax.convert.hf import export_hf
    from qwenvl_jax.model.factory import build_model
    from qwenvl_jax.model.options import ModelOptions

    cfg = config_lib.get_preset("tiny", **RANDOM_MODELS[name])
    export_hf(nnx.state(build_model(cfg, None, ModelOptions.inference(), seed=0)), cfg, out_dir)
    return out_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(image_dir: str) -> list[str]:
    """data: URLs of the load's images."""
    from PIL import Image

    if image_dir:
        if not os.path.isdir(image_dir):
            raise MissingPathError(f"--image_dir={image_dir}: not a directory")
        names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith((".png", ".jpg")))
        if not names:
            raise MissingPathError(f"--image_dir={image_dir}: holds no .png or .jpg file")
        blobs = [open(os.path.join(image_dir, n), "rb").read() for n in names]
        kinds = ["png" if n.lower().endswith(".png") else "jpeg" for n in names]
    else:
        rng = np.random.default_rng(0)
        blobs, kinds = [], []
        for size in ((64, 48), (320, 240), (640, 480), (448, 448)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buf, "PNG")
            blobs.append(buf.getvalue())
            kinds.append("png")
    return [
        f"data:image/{k};base64,{base64.b64encode(b).decode()}"
        for b, k in zip(blobs, kinds, strict=True)
    ]


def requests(n: int, images: list[str], model: str, max_tokens: int) -> list[dict]:
    """n chat request bodies: image i % len(images) with prompt i % len(PROMPTS)."""
    out = []
    for i in range(n):
        parts = [
            {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
            {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
        ]
        out.append({"model": model, "messages": [{"role": "user", "content": parts}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}})  # fmt: skip
    return out


def _encode(body: dict | bytes) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


async def _one(client, url: str, body: dict | bytes) -> dict:
    """One streamed request (a body, or its JSON already encoded): TTFT, TPOT, tokens, or the
    error."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    post = dict(content=_encode(body), headers={"content-type": "application/json"})
    async with client.stream("POST", url + "/v1/chat/completions", **post) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return {"ttft": first - t0, "tpot": tpot, "tokens": tokens, "latency": end - t0}


async def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Sends `bodies` with at most `concurrency` in flight; the serving metrics."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    # Encoded before the clock starts: the client shares the server's CPU, and a body holds a
    # base64 image (up to 1.2 MB of JSON here) that it would otherwise encode again each time.
    bodies = [_encode(b) for b in bodies]
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def bounded(body):
            async with sem:
                return await _one(client, url, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(b) for b in bodies))
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    ttft = np.array([r["ttft"] for r in ok]) * 1e3
    tpot = np.array([r["tpot"] for r in ok if r["tpot"] is not None]) * 1e3

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p99": pct(ttft, 99),
        "tpot_ms_p50": pct(tpot, 50),
        "tpot_ms_p99": pct(tpot, 99),
    }


def _line(r: dict) -> str:
    return (
        f"concurrency {r['concurrency']:>3}: {r['requests']} requests in {r['wall_s']:.1f} s,"
        f" {r['requests_per_s']:.2f} requests/s, {r['output_tokens_per_s']:.1f} output tokens/s,"
        f" TTFT p50 {r['ttft_ms_p50']:.0f} ms p99 {r['ttft_ms_p99']:.0f} ms,"
        f" TPOT p50 {r['tpot_ms_p50']:.1f} ms p99 {r['tpot_ms_p99']:.1f} ms"
        + (f", {len(r['errors'])} errors (first: {r['errors'][0]})" if r["errors"] else "")
    )


def _rss_mb(pid: int) -> float | None:
    """Resident memory of process `pid` in MiB (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def soak(url: str, bodies: list[dict], concurrency: int, seconds: float, pid, log) -> dict:
    """`concurrency` clients sending `bodies` round robin for `seconds`; RSS every ~5 s."""
    import httpx

    stop = time.monotonic() + seconds
    done, errors, rss = 0, [], []
    bodies = [_encode(b) for b in bodies]
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker(k):
            nonlocal done
            i = k
            while time.monotonic() < stop:
                r = await _one(client, url, bodies[i % len(bodies)])
                i += concurrency
                if "error" in r:
                    errors.append(r["error"])
                else:
                    done += 1

        async def sampler():
            while time.monotonic() < stop:
                if pid is not None:
                    rss.append(_rss_mb(pid))
                await asyncio.sleep(min(5.0, max(0.0, stop - time.monotonic())))
            if pid is not None:
                rss.append(_rss_mb(pid))

        await asyncio.gather(sampler(), *(worker(k) for k in range(concurrency)))
        health = (await client.get(url + "/health")).json()
    out = {"seconds": seconds, "requests": done, "errors": errors, "rss_mb": rss, "health": health}
    rss_text = (
        f", server RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB (max {max(rss):.0f}, {len(rss)} samples)"
        if rss and None not in rss
        else ""
    )
    log(
        f"soak {seconds:.0f} s at concurrency {concurrency}: {done} requests,"
        f" {len(errors)} errors{rss_text}; after: queue {health.get('queue')},"
        f" running {health.get('running')}, free slots"
        f" {(health.get('slots') or 0) - (health.get('running') or 0)} of {health.get('slots')}"
    )
    return out


async def long_prompt_probe(
    url: str, model: str, rows: int, n_long: int, word: str = "hey"
) -> dict:
    """`rows` streamed completions decode; once each has streamed a few chunks, a raw prompt of
    about `n_long` tokens arrives. The rows' gaps between streamed chunks while it waits for its
    first token (its prefill, in chunks) against their gaps before it arrived. A chunk carries
    one token or more (text held back, e.g. an incomplete UTF-8 character, goes out with the next
    one), so a gap is an upper bound of that row's time per output token."""
    import httpx

    arrivals: list[list[float]] = [[] for _ in range(rows)]
    window: dict = {}
    going = asyncio.Event()
    n_tokens = max(64, n_long)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=rows + 4)) as c:

        async def row(i):
            # No max_tokens: the server's default, up to its max_seq_len (decoding throughout).
            body = {"model": model, "prompt": f"Count {i}:", "stream": True, "temperature": 0}
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        arrivals[i].append(time.perf_counter())
                        if all(len(a) >= 3 for a in arrivals):
                            going.set()
                        if "end" in window:
                            return

        async def long_one():
            try:  # a row that ends early (eos) never streams three chunks: go after a minute
                await asyncio.wait_for(going.wait(), 60)
            except TimeoutError:
                pass
            prompt = word + " hello" * (n_tokens - 1)
            window["start"] = time.perf_counter()
            r = await c.post(url + "/v1/completions",
                             json={"model": model, "prompt": prompt, "max_tokens": 1})  # fmt: skip
            window["end"] = time.perf_counter()
            window["usage"] = r.json().get("usage", {}) if r.status_code == 200 else r.text[:200]

        tasks = [asyncio.create_task(row(i)) for i in range(rows)]
        await long_one()
        await asyncio.wait(tasks, timeout=120)
        for t in tasks:
            t.cancel()
    t0, t1 = window["start"], window["end"]
    during, before = [], []
    for a in arrivals:
        gaps = np.diff(a)
        ends = np.asarray(a[1:])
        during += list(gaps[(ends > t0) & (ends <= t1)])
        before += list(gaps[ends <= t0])
    during_ms, before_ms = np.array(during) * 1e3, np.array(before) * 1e3

    def pct(x, q):
        return float(np.percentile(x, q)) if len(x) else float("nan")

    return {
        "rows": rows,
        "long_prompt_usage": window["usage"],
        "long_prompt_ttft_ms": (t1 - t0) * 1e3,
        "chunks_during": len(during),
        "gap_ms_p50_during": pct(during_ms, 50),
        "gap_ms_p99_during": pct(during_ms, 99),
        "gap_ms_max_during": float(during_ms.max()) if len(during) else float("nan"),
        "gap_ms_p50_before": pct(before_ms, 50),
        "gap_ms_p99_before": pct(before_ms, 99),
    }


def _long_line(r: dict) -> str:
    u = r["long_prompt_usage"]
    n = u.get("prompt_tokens") if isinstance(u, dict) else u
    return (
        f"long prompt ({n} tokens) arriving while {r['rows']} rows decode: its TTFT"
        f" {r['long_prompt_ttft_ms']:.0f} ms; the running rows streamed {r['chunks_during']} chunks"
        f" meanwhile, gap p50 {r['gap_ms_p50_during']:.1f} ms p99 {r['gap_ms_p99_during']:.1f} ms"
        f" max {r['gap_ms_max_during']:.1f} ms (before it arrived: p50 {r['gap_ms_p50_before']:.1f}"
        f" ms p99 {r['gap_ms_p99_before']:.1f} ms)"
    )


def start_server(checkpoint: str, port: int, extra: list[str], timeout_s: float = 600):
    """`python -m qwenvl_jax.serve` in a subprocess; returns it once /health answers."""
    import httpx

    cmd = [sys.executable, "-m", "qwenvl_jax.serve", f"--checkpoint={checkpoint}",
           f"--port={port}", *extra]  # fmt: skip
    # The server's log goes to a file: a pipe nobody reads would block it once full.
    log_file = tempfile.NamedTemporaryFile(
        "w+", prefix="qwenvl_serve_", suffix=".log", delete=False
    )
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_file.name
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_file.name) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()] or [""]
            raise ConfigError(
                f"the server exited with {proc.returncode}: {lines[-1]} (log: {log_file.name})"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise ConfigError(f"the server did not answer /health within {timeout_s:.0f} s")


def run(url, checkpoint, model, concurrency, num_requests, max_tokens, image_dir, server_flags,
        soak_s=0, log=print, long_prompt=0, random_model="",
        server_start_s=600) -> dict:  # fmt: skip
    """The benchmark (see the module docstring); returns both runs and the ratio."""
    import httpx

    if concurrency < 1 or num_requests < 1 or max_tokens < 1:
        raise ConfigError("--concurrency, --num_requests and --max_tokens must be >= 1")
    # httpx logs every request at INFO (absl's root level): a line per request, written by the
    # client on the cores it shares with the server, inside the timed runs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    proc = None
    if not url and random_model and not checkpoint:
        checkpoint = write_random_checkpoint(
            random_model, os.path.join(tempfile.mkdtemp(prefix="qwenvl_bench_"), random_model)
        )
        log(f"random checkpoint --random_model={random_model} written to {checkpoint}")
    if not url:
        if not checkpoint:
            raise ConfigError(
                "--mode=serve needs --url=http://HOST:PORT, --checkpoint=DIR or --random_model"
            )
        if not os.path.exists(checkpoint):
            raise MissingPathError(f"--checkpoint={checkpoint}: no such file or directory")
        port = _free_port()
        extra = shlex.split(server_flags)
        if not any(f.startswith("--max_batch") for f in extra):
            extra.append(f"--max_batch={concurrency}")
        log(f"starting the server: --checkpoint={checkpoint} {' '.join(extra)}")
        # A SIGTERM to the benchmark unwinds through the `finally` below, which stops the server.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        proc = start_server(checkpoint, port, extra, timeout_s=server_start_s)
        url = f"http://127.0.0.1:{port}"
    try:
        if not model:
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        bodies = requests(num_requests, _images(image_dir), model, max_tokens)
        # Warm-up (untimed): compilations and first-touch costs of both shapes of the load.
        asyncio.run(run_load(url, bodies[: min(concurrency, num_requests)], concurrency))
        many = asyncio.run(run_load(url, bodies, concurrency))
        log(_line(many))
        one = asyncio.run(run_load(url, bodies, 1))
        log(_line(one))
        ratio = many["requests_per_s"] / one["requests_per_s"]
        log(f"{concurrency} concurrent clients vs one at a time: {ratio:.2f}x requests/s")
        out = {"concurrent": many, "sequential": one, "ratio": ratio, "url": url}
        if long_prompt > 0:
            # Untimed first: the later chunks' programs (attending past the first bucket) compile.
            asyncio.run(long_prompt_probe(url, model, concurrency, long_prompt, word="hi"))
            out["long_prompt"] = asyncio.run(
                long_prompt_probe(url, model, concurrency, long_prompt)
            )
            log(_long_line(out["long_prompt"]))
        if soak_s > 0:
            pid = proc.pid if proc is not None else None
            out["soak"] = asyncio.run(soak(url, bodies, concurrency, soak_s, pid, log))
        return out
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> dict:
    """`--mode=serve` from the parsed flags."""
    return run(_URL.value, _CKPT.value, _MODEL.value, _CONC.value, _NREQ.value, _MAXTOK.value,
               _IMGDIR.value, _SFLAGS.value, _SOAK.value, long_prompt=_LONG.value,
               random_model=_RANDOM.value, server_start_s=_START_S.value)  # fmt: skip
