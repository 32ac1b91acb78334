"""Decode in place: the compiled decode loop updates the stacked KV cache without copying it.

Reads the optimized HLO of `generate._decode` for the tiny model (scanned and unrolled layers):
no instruction anywhere in the program produces a buffer of the whole cache's shape by copy,
concatenate or broadcast (the earlier per-layer slice + re-stack made a fresh cache every token),
and the cache is written by dynamic-update-slice. That the outputs did not change is the business
of the generation tests: cached greedy decoding equals full recomputation (tests/test_generate.py,
scanned layers) and the published model's greedy generations (tests/test_api.py, unrolled).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import generate as gen
from qwenvl_jax.config import get_preset
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwenvl import QWenLMHeadModel

CFG = get_preset("tiny", vocab_size=1000, visual={"image_start_id": 990})
EOS = 999
B, S = 2, 256
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (\S+) ([\w-]+)\(")


def _model(scan):
    return nnx.jit(lambda: QWenLMHeadModel(CFG, ModelOptions(scan_layers=scan), rngs=nnx.Rngs(3)))()


@pytest.fixture(params=[True, False], ids=["scan", "unrolled"])
def abstract_model(request):
    # Shapes only: lowering and compiling needs no weights.
    opts = ModelOptions(scan_layers=request.param)
    return nnx.eval_shape(lambda: QWenLMHeadModel(CFG, opts, rngs=nnx.Rngs(3)))


def _decode_hlo(model) -> str:
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: gen.init_cache(CFG, B, S, jnp.float32))
    sampling = (np.float32(1), np.float32(1), np.int32(0), np.int32(EOS))
    lowered = gen._decode.lower(
        graphdef, state, jnp.zeros(B, jnp.int32), cache, np.full((B, 4), -1, np.int32),
        gen._stop_table([]), np.int32(5), np.int32(10), jax.random.key(0), sampling,
        ntk_alpha=1.0, use_logn=True, do_sample=False, top_k=0, ctx=None,
    )  # fmt: skip
    return lowered.compile().as_text()


def test_decode_loop_writes_the_cache_in_place(abstract_model):
    hlo = _decode_hlo(abstract_model)
    assert "while" in hlo
    cache_shape = f"f32[{CFG.num_hidden_layers},{B},{CFG.num_attention_heads},{S},{CFG.head_dim}]"
    ops = {}
    for line in hlo.splitlines():
        m = _OP.match(line)
        if m and m.group(1).startswith(cache_shape + "{"):
            ops.setdefault(m.group(2), []).append(line.strip()[:160])
    copies = {op: v for op, v in ops.items() if op in ("copy", "concatenate", "broadcast")}
    assert not copies, f"cache-sized copies in the decode program: {copies}"
    assert "dynamic-update-slice" in ops, sorted(ops)


def test_per_row_cache_index_equals_scalar():
    # The serving engine's rows sit at different lengths: a [B] cache_index writes each row at its
    # own slot (one scatter); with equal entries it must equal the scalar path exactly.
    model = _model(True)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 900, (B, 3)), jnp.int32)
    cache = gen.init_cache(CFG, B, 16, jnp.float32)
    run = nnx.jit(lambda m, c, i: m(ids, cache=c, cache_index=i))
    a, ca = run(model, cache, jnp.int32(4))
    b, cb = run(model, cache, jnp.full((B,), 4, jnp.int32))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in ca:
        np.testing.assert_array_equal(np.asarray(ca[k]), np.asarray(cb[k]))
    # Different slots per row: row 1 written at 7 leaves its slots 4..6 empty.
    _, cc = run(model, cache, jnp.asarray([4, 7], jnp.int32))
    seg = np.asarray(cc["segment_ids"])
    assert seg[0, 4:7].tolist() == [1, 1, 1] and seg[1, 4:7].tolist() == [0, 0, 0]
    assert seg[1, 7:10].tolist() == [1, 1, 1]
    # Layer 0's values carry no position: row 1's, written at 7..9, are the scalar path's 4..6.
    np.testing.assert_array_equal(
        np.asarray(cc["v"])[0, 1, :, 7:10], np.asarray(ca["v"])[0, 1, :, 4:7]
    )
