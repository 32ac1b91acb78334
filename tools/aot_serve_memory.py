"""Per-chip memory of the 7B serving engine (qwenvl_jax.serve), compiled ahead of time for TPU
slices on a CPU host: abstract inputs only, nothing is allocated.

The engine's three kinds of program (`serve._steps`) are compiled at their largest bucket, with
the arguments `serve.engine.Engine` passes them:

- decode: `decode_step` over every slot (rows = `max_batch`) attending over the whole slot
  (`kv_len` = the cache length), the slot cache donated;
- prefill: `prefill_chunk` of one `prefill_chunk`-token chunk at the end of a slot (`kv_len` = the
  cache length) with one image's adapter outputs, the slot cache donated;
- encode: `encode_images` of the largest image batch one admission encodes when every request
  holds one image (`max_batch` rounded up to a power of two).

The engine's sizes (slots rounded up to data x fsdp, the cache length) come from `Engine` itself,
built over the abstract model (its constructor allocates nothing; `start` would). Parameters are
placed as `QwenVL.from_pretrained(mesh=...)` places them (tools/aot_inference_memory.py's
`abstract_model`), the cache as `generate.make_cache`, activations under the engine's
`generate.inference_rules` per row count; host inputs (ids, tokens, sampling) replicated.

Resident per chip = all parameters (a program's arguments leave out the weights it does not read,
e.g. the ViT in decode, but they stay in HBM) + the slot cache + the program's other inputs,
outputs (less the donated cache) and temporaries. The image-feature LRU (`--image_cache_mb`,
256 MB by default) comes on top of it.

  JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost ALLOW_MULTIPLE_LIBTPU_LOAD=1 \\
    python tools/aot_serve_memory.py v5e8 v6e1-int8 [--slots N] [--programs decode,prefill,encode]

Needs libtpu (the `tpu` extra).
"""

from __future__ import annotations

import argparse
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from aot_inference_memory import _devices, abstract_model
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax import generate as gen
from qwenvl_jax import sharding as shd
from qwenvl_jax.config import get_preset
from qwenvl_jax.model.qwen import init_cache
from qwenvl_jax.serve import _steps
from qwenvl_jax.serve.engine import Engine
from qwenvl_jax.train.aot import compiled_report

GiB = 2**30
PROGRAMS = ("decode", "prefill", "encode")
# name: (topology, chip config, mesh sizes, slots, max_seq_len, quantize, HBM GiB per chip that
# XLA lets a program use: its "available HBM" of a v5e (16 GiB) and a v6e (32 GiB) chip)
CASES = {
    "v5e8": ("v5e:2x4", "default", {"data": 1, "fsdp": 4, "model": 2}, 64, 2048, None, 15.75),
    # The same slice with the model axis only: the cache's slot axis is not split (see docs).
    "v5e8-model8": (
        "v5e:2x4",
        "default",
        {"data": 1, "fsdp": 1, "model": 8},
        64,
        2048,
        None,
        15.75,
    ),
    "v6e1-int8": (
        "v6e:1x1",
        "default",
        {"data": 1, "fsdp": 1, "model": 1},
        64,
        2048,
        "int8",
        31.25,
    ),
}


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _chip_bytes(tree) -> int:
    """Bytes per chip of replicated ShapeDtypeStructs."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _compile(fn, *args, **static) -> tuple[dict, int]:
    """(compiled_report or {"error": first line}, seconds). XLA refuses a program that does not
    fit the chip's HBM at compile time on some versions; that refusal is the answer then."""
    t0 = time.time()
    try:
        rep = compiled_report(fn.lower(*args, **static).compile())
    except Exception as e:  # noqa: BLE001 -- reported, not hidden: the case goes on
        rep = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
    return rep, round(time.time() - t0)


def run(name: str, slots: int | None = None, programs=PROGRAMS, *, preset: str = "qwen-vl-7b",
        devices: list | None = None) -> dict:  # fmt: skip
    """One case: its memory figures per program (compiled_report + resident_bytes, fits) and
    compile seconds. `slots` overrides the case's; `preset` and `devices` (instead of the case's
    TPU topology) are for the tests, which compile the tiny model for this host's CPUs."""
    topology, chip_config, sizes, max_batch, max_seq_len, quantize, hbm = CASES[name]
    max_batch = slots or max_batch
    cfg = get_preset(preset)
    dtype = jnp.bfloat16
    mesh = shd.make_mesh(sizes, devices or _devices(topology, chip_config))
    graphdef, state, param_bytes = abstract_model(cfg, mesh, dtype, quantize)
    # The engine's own sizing (slots rounded to data x fsdp, slot length, chunk bucket).
    model = types.SimpleNamespace(
        config=cfg, mesh=mesh, model=nnx.merge(graphdef, state),
        tokenizer=types.SimpleNamespace(eod_id=cfg.vocab_size - 1),
    )  # fmt: skip
    eng = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len)
    rows, cache_len, chunk = eng.max_batch, eng.cache_len, eng.prefill_chunk

    cache_sh = gen.cache_shardings(cfg, mesh, rows)
    shapes = jax.eval_shape(lambda: init_cache(cfg, rows, cache_len, dtype))
    cache = {k: _sds(v.shape, v.dtype, cache_sh[k]) for k, v in shapes.items()}
    cache_bytes = shd.device_bytes(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in shapes.items()}, cache_sh
    )
    rep = NamedSharding(mesh, PartitionSpec())

    def host(shape, dt):  # a numpy input of the engine's: placed replicated
        return _sds(shape, dt, rep)

    def ctx(b):  # as Engine.__init__ builds its per-row-count contexts
        return gen.ShardingContext(mesh, gen.inference_rules(mesh, b))

    use_logn = bool(cfg.use_logn_attn)
    q, d, s = cfg.visual.n_queries, cfg.hidden_size, cfg.visual.image_size
    n_images = _pow2(rows)
    out = {
        "case": name,
        "topology": f"{topology} ({chip_config})",
        "chips": mesh.size,
        "mesh": dict(mesh.shape),
        "slots": rows,
        "max_seq_len": max_seq_len,
        "cache_len": cache_len,
        "prefill_chunk": chunk,
        "encode_images": n_images,
        "quantize": quantize or "bf16",
        "hbm_gib": hbm,
        "param_gib": param_bytes / GiB,
        "cache_gib": cache_bytes / GiB,
    }
    for prog in programs:
        if prog == "decode":
            small = (host((rows,), jnp.int32), host((rows,), jnp.int32), host((rows,), jnp.bool_),
                     (host((rows,), jnp.float32), host((rows,), jnp.float32),
                      host((rows,), jnp.int32)), host((rows,), jnp.int32))  # fmt: skip
            r, secs = _compile(_steps.decode_step, graphdef, state, cache, *small, kv_len=cache_len,
                               use_logn=use_logn, ctx=ctx(rows))  # fmt: skip
        elif prog == "prefill":
            i32 = host((), jnp.int32)
            ids = host((1, chunk), jnp.int32)
            small = (i32, ids, ids, i32, host((1, q, d), dtype), ids)
            r, secs = _compile(_steps.prefill_chunk, graphdef, state, cache, *small,
                               kv_len=cache_len, use_logn=use_logn, ctx=ctx(1))  # fmt: skip
        else:
            small = (host((n_images, s, s, 3), jnp.float32),)
            r, secs = _compile(_steps.encode_images, graphdef, state, *small, ctx=ctx(1))
        if "error" not in r:
            # Everything the engine holds while this program runs (see the module docstring).
            rest = r["peak_estimate_bytes"] - r["argument_size_in_bytes"]  # out - aliased + temp
            r["resident_bytes"] = param_bytes + cache_bytes + _chip_bytes(small) + rest
            r["fits"] = r["resident_bytes"] <= hbm * GiB
        out[prog] = r
        out[f"{prog}_s"] = secs
        print(prog, json.dumps(r), f"{secs} s", flush=True)
    return out


def _pow2(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


def table(rows: list[dict]) -> str:
    lines = [
        "| case | slice | mesh (data, fsdp, model) | slots x cache | weights"
        " | params per chip (all) | KV cache per chip | program | args | temp"
        " | resident per chip | HBM per chip | fits | compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["mesh"]
        for prog in PROGRAMS:
            if prog not in r:
                continue
            x = r[prog]
            what = {"decode": f"decode ({r['slots']} rows)",
                    "prefill": f"prefill ({r['prefill_chunk']}-token chunk)",
                    "encode": f"encode ({r['encode_images']} images)"}[prog]  # fmt: skip
            head = (f"| {r['case']} | {r['topology']}, {r['chips']} chips"
                    f" | {m['data']}, {m['fsdp']}, {m['model']}"
                    f" | {r['slots']} x {r['cache_len']} | {r['quantize']}"
                    f" | {r['param_gib']:.2f} GiB | {r['cache_gib']:.2f} GiB | {what}")  # fmt: skip
            if "error" in x:
                lines.append(f"{head} | | | {x['error']} | {r['hbm_gib']} GiB | no"
                             f" | {r[prog + '_s']} s |")  # fmt: skip
                continue
            lines.append(
                f"{head} | {x['argument_size_in_bytes'] / GiB:.2f} GiB"
                f" | {x['temp_size_in_bytes'] / GiB:.2f} GiB"
                f" | {x['resident_bytes'] / GiB:.2f} GiB | {r['hbm_gib']} GiB"
                f" | {'yes' if x['fits'] else 'no'} | {r[prog + '_s']} s |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    p.add_argument("--slots", type=int, default=None, help="decode slots (default: the case's)")
    p.add_argument("--programs", default=",".join(PROGRAMS), help="of " + ",".join(PROGRAMS))
    a = p.parse_args()
    progs = [x for x in a.programs.split(",") if x]
    if bad := [x for x in a.cases if x not in CASES]:
        p.error(f"unknown case {bad}; valid: {', '.join(CASES)}")
    if bad := [x for x in progs if x not in PROGRAMS]:
        p.error(f"--programs: unknown {bad}; valid: {','.join(PROGRAMS)}")
    print("jax", jax.__version__, flush=True)
    results = []
    for n in a.cases or list(CASES):
        res = run(n, a.slots, progs)
        print("RESULT", json.dumps(res), flush=True)
        results.append(res)
    print(table(results))
