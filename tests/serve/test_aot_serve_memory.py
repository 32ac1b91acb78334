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
