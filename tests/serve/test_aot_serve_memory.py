"""tools/aot_serve_memory.py on this host's CPUs (no libtpu): the serving engine's programs for
the tiny model compiled over the v5e-8 case's mesh, the sizes the engine itself picks, the slot
cache per chip and its donation."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import aot_serve_memory as tool  # noqa: E402

from qwenvl_jax.config import get_preset  # noqa: E402


@pytest.fixture(scope="module")
def v5e8_tiny():
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 host CPU devices of tests/conftest.py")
    # 6 slots: the engine rounds them up to a multiple of data x fsdp (4).
    return tool.run("v5e8", slots=6, preset="tiny", devices=jax.devices()[:8])


def test_engine_sizes_and_slot_cache_per_chip(v5e8_tiny):
    r = v5e8_tiny
    assert r["mesh"] == {"data": 1, "fsdp": 4, "model": 2}
    assert (r["slots"], r["cache_len"], r["prefill_chunk"], r["encode_images"]) == (8, 2048, 512, 8)
    cfg = get_preset("tiny")
    # k and v [L, slots, S, heads, head_dim] bf16: slots over fsdp (4), heads over model (2);
    # segment ids int32 [slots, S]: slots over fsdp, the same on both model shards.
    kv = 2 * cfg.num_hidden_layers * 8 * 2048 * cfg.num_attention_heads * cfg.head_dim * 2 // 8
    seg = 8 * 2048 * 4 // 4
    assert r["cache_gib"] * tool.GiB == kv + seg


def test_programs_compile_with_the_cache_donated(v5e8_tiny):
    r = v5e8_tiny
    kv = r["cache_gib"] * tool.GiB
    for prog in ("decode", "prefill"):
        x = r[prog]
        assert "error" not in x, x
        # The slot cache is an argument and is updated in place (donated), not copied.
        assert x["argument_size_in_bytes"] >= kv
        assert x["alias_size_in_bytes"] >= 0.99 * kv, (prog, x)
    for prog in tool.PROGRAMS:
        x = r[prog]
        assert x["resident_bytes"] >= (r["param_gib"] + r["cache_gib"]) * tool.GiB
        assert x["fits"] is True


@pytest.fixture(scope="module")
def fsdp_engine(hf_dir):
    import jax

    from qwenvl_jax import QwenVL
    from qwenvl_jax.serve.engine import Engine

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 host CPU devices of tests/conftest.py")
    qwen = QwenVL.from_pretrained(hf_dir, dtype="float32", mesh="fsdp=4,model=2")
    # One slot length (128) and one chunk bucket: few programs to compile over 8 devices.
    eng = Engine(qwen, max_batch=8, max_seq_len=128, prefill_chunk=64)
    eng.start()
    yield qwen, eng
    eng.shutdown(grace_s=5)


def _full_cache_buffers(hlo: str, slots: int, length: int) -> list[str]:
    """Shapes in a compiled (per-chip) program that hold every slot's positions: [L, slots,
    heads, length, H] k/v or [slots, length] segment ids."""
    import re

    pattern = rf"\w+\[(?:\d+,)?{slots},(?:\d+,)?{length}[,\]][\d,]*\]?"
    return sorted(set(re.findall(pattern, hlo)))


@pytest.mark.slow  # ~85 s on the 2-core box: the engine compiles its programs over 8 devices
def test_prefill_on_an_fsdp_mesh_touches_only_its_slots(fsdp_engine, hf_dir):
    # fsdp = 4 splits the 8 slots 2 per chip: the prefill (and the prefix cache's read/write)
    # must index its slot inside each chip's block, not gather the whole cache onto every chip,
    # and the greedy answers (rows on several chips at once) still equal generate's.
    import jax
    import numpy as np

    from qwenvl_jax import QwenVL
    from qwenvl_jax.serve import _steps
    from qwenvl_jax.serve.engine import EngineRequest, Sampling

    qwen, eng = fsdp_engine
    one = QwenVL.from_pretrained(hf_dir, dtype="float32")  # the reference, on one device
    texts = [f"Count to {n} in words, then tell a story about {n} cats:" * 6 for n in range(4)]
    want = [one.generate(t, max_new_tokens=4) for t in texts]

    def run(batch):
        handles = [
            eng.submit(EngineRequest(qwen.tokenizer.encode(t), [], Sampling(max_tokens=4)))
            for t in batch
        ]
        return [[ev.token for ev in h.events(timeout=120) if ev.kind == "token"] for h in handles]

    # 4 rows at once take slots 0..3: local rows 0 and 1 of the first two fsdp shards.
    assert run(texts) == want
    # Again, alone: its leading block comes from the prefix cache (read from a slot of the first
    # run, written into slot 0).
    before = eng.stats()["prefix_tokens_reused"]
    assert run(texts[3:]) == want[3:]
    assert eng.stats()["prefix_tokens_reused"] - before >= 64

    cache = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), eng._cache
    )
    slots, length = eng.max_batch, eng.cache_len
    assert (cache["k"].shape[1], cache["k"].shape[3]) == (slots, length)
    i32 = np.int32(5)
    ids = np.zeros((1, 64), np.int32)
    feats = np.zeros((1, qwen.config.visual.n_queries, qwen.config.hidden_size), np.float32)
    prefill = _steps.prefill_chunk.lower(
        eng._graphdef, eng._state, cache, i32, ids, ids, i32, feats, ids - 1,
        kv_len=length, use_logn=eng._use_logn, ctx=eng._ctx1,
    ).compile()  # fmt: skip
    k = _steps.read_block.lower(cache, i32, i32, size=64, mesh=qwen.mesh).out_info[0]
    block = jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=k.sharding)
    write = _steps.write_block.lower(cache, i32, i32, block, block, mesh=qwen.mesh).compile()
    read = _steps.read_block.lower(cache, i32, i32, size=64, mesh=qwen.mesh).compile()
    for name, prog in (("prefill", prefill), ("read_block", read), ("write_block", write)):
        hlo = prog.as_text()
        assert _full_cache_buffers(hlo, slots // 4, length), name  # the chip's own block is there
        assert _full_cache_buffers(hlo, slots, length) == [], name
    # The cache stays donated: updated in place, not copied.
    assert prefill.memory_analysis().alias_size_in_bytes >= sum(
        x.size * x.dtype.itemsize // 8 for x in jax.tree.leaves(cache)
    )
