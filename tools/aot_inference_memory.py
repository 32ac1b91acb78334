"""Per-chip memory of 7B inference (generate.py's `_prefill` and `_decode`), compiled ahead of time
for TPU slices on a CPU host: abstract inputs only, nothing is allocated.

The parameters are sharded as `QwenVL.from_pretrained(mesh=...)` places them (`build_model`: the
training rules `sharding.DEFAULT_RULES`), the KV cache as `generate.make_cache` (batch over
data x fsdp, heads over model), activations under `generate.inference_rules`. The prompt holds one
448 px image per row (one `<img>` span of 256 queries); the cache length is what `generate` picks
for prompt + max_new_tokens (rounded up to `cache_bucket` 128). The while-loop decode is compiled
as `generate` calls it (with the cache donated).

  PYTHONPATH=/tmp/mine/tpu JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost \
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python tools/aot_inference_memory.py [case ...]

Cases (default: all): v5e8, v4-8, v5e1-int8 (see CASES). Needs libtpu (the `tpu` extra).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax import generate as gen
from qwenvl_jax import sharding as shd
from qwenvl_jax.config import get_preset
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwen import inference_scaling, init_cache
from qwenvl_jax.model.qwenvl import QWenLMHeadModel
from qwenvl_jax.train.aot import compiled_report

GiB = 2**30
# name: (topology, chip config, mesh sizes, batch, prompt length, new tokens, quantize, HBM GiB)
CASES = {
    "v5e8": ("v5e:2x4", "default", {"data": 1, "fsdp": 4, "model": 2}, 8, 2048, 64, None, 16),
    "v4-8": ("v4:2x2x1", "megacore", {"data": 1, "fsdp": 2, "model": 2}, 8, 2048, 64, None, 32),
    "v5e1-int8": (
        "v5e:1x1",
        "default",
        {"data": 1, "fsdp": 1, "model": 1},
        1,
        2048,
        64,
        "int8",
        16,
    ),  # fmt: skip
}


def _devices(topology: str, chip_config: str) -> list:
    kw = {}
    if topology.endswith(":1x1"):  # one chip (v5e:1x1, v6e:1x1): a one-chip host
        kw["chips_per_host_bounds"] = (1, 1, 1)
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=chip_config, num_slices=1, **kw
    )
    return list(topo.devices)


def abstract_model(cfg, mesh, dtype, quantize: str | None):
    """The 7B model as shapes only, sharded on `mesh` as `QwenVL.from_pretrained(mesh=...)` places
    it: (graphdef, state of sharded ShapeDtypeStructs, parameter bytes per chip). Also the serving
    engine's (tools/aot_serve_memory.py)."""

    def make():
        return QWenLMHeadModel(cfg, ModelOptions.inference(dtype), rngs=nnx.Rngs(0))

    abstract = nnx.eval_shape(make)
    if quantize:
        from qwenvl_jax import quantize as quant_lib

        quant_lib.convert_modules(abstract, quantize)
    graphdef, state = nnx.split(abstract)
    # As model.factory.build_model places the parameters on a mesh.
    logical = nnx.to_pure_dict(shd.logical_axes_of_state(state))
    want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    shardings = shd.param_shardings(want, logical, mesh, shd.DEFAULT_RULES)
    param_bytes = shd.device_bytes(want, shardings)
    sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), want, shardings
    )
    nnx.replace_by_pure_dict(state, sharded)
    return graphdef, state, param_bytes


def run(name: str) -> dict:
    topology, chip_config, sizes, batch, prompt, new, quantize, hbm = CASES[name]
    cfg = get_preset("qwen-vl-7b")
    dtype = jnp.bfloat16
    mesh = shd.make_mesh(sizes, _devices(topology, chip_config))
    graphdef, state, param_bytes = abstract_model(cfg, mesh, dtype, quantize)

    cache_len = max(gen._round_up(prompt + new, 128), gen._round_up(prompt, 64))
    cache_sh = gen.cache_shardings(cfg, mesh, batch)
    cache = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(lambda: init_cache(cfg, batch, cache_len, dtype)),
        cache_sh,
    )
    cache_bytes = shd.device_bytes(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in cache.items()}, cache_sh
    )
    row = cache_sh["segment_ids"]  # batch over data x fsdp
    rep = NamedSharding(mesh, PartitionSpec())
    img = cfg.visual.image_size
    ids = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=row)
    by_row = NamedSharding(mesh, PartitionSpec(row.spec[0]))
    images = jax.ShapeDtypeStruct((batch, 1, img, img, 3), jnp.float32, sharding=by_row)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep)
    sampling = tuple(
        jax.ShapeDtypeStruct((), d, sharding=rep)
        for d in (jnp.float32, jnp.float32, jnp.int32, jnp.int32)
    )
    i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    scaling = inference_scaling(cfg, prompt)
    static = dict(
        ntk_alpha=scaling["ntk_alpha"],
        use_logn=scaling["use_logn"],
        do_sample=False,
        top_k=0,
        ctx=gen.ShardingContext(mesh, gen.inference_rules(mesh, batch)),
    )
    out = {
        "case": name,
        "topology": f"{topology} ({chip_config})",
        "chips": mesh.size,
        "mesh": dict(mesh.shape),
        "batch": batch,
        "prompt": prompt,
        "cache_len": cache_len,
        "quantize": quantize or "bf16",
        "hbm_gib": hbm,
        "param_gib": param_bytes / GiB,
        "cache_gib": cache_bytes / GiB,
    }
    t0 = time.time()
    pre = gen._prefill.lower(graphdef, state, ids, ids, images, ids, cache, i32, rng, sampling,
                             **static).compile()  # fmt: skip
    out["prefill"] = compiled_report(pre)
    out["prefill_s"] = round(time.time() - t0)
    t0 = time.time()
    first = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=by_row)
    recent = jax.ShapeDtypeStruct((batch, 4), jnp.int32, sharding=row)
    stops = jax.ShapeDtypeStruct((4, 4), jnp.int32, sharding=rep)
    dec = gen._decode.lower(graphdef, state, first, cache, recent, stops, i32, i32, rng, sampling,
                            **static).compile()  # fmt: skip
    out["decode"] = compiled_report(dec)
    out["decode_s"] = round(time.time() - t0)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| case | slice | mesh (data, fsdp, model) | batch x prompt (cache) | weights"
        " | params per chip | KV cache per chip | step | args | temp | peak per chip"
        " | HBM per chip |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["mesh"]
        for step in ("prefill", "decode"):
            x = r[step]
            lines.append(
                f"| {r['case']} | {r['topology']}, {r['chips']} chips"
                f" | {m['data']}, {m['fsdp']}, {m['model']}"
                f" | {r['batch']} x {r['prompt']} ({r['cache_len']}) | {r['quantize']}"
                f" | {r['param_gib']:.2f} GiB | {r['cache_gib']:.2f} GiB | {step}"
                f" | {x['argument_size_in_bytes'] / GiB:.2f} GiB"
                f" | {x['temp_size_in_bytes'] / GiB:.2f} GiB"
                f" | {x['peak_estimate_bytes'] / GiB:.2f} GiB | {r['hbm_gib']} GiB |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    print("jax", jax.__version__)
    rows = []
    for n in names:
        r = run(n)
        print("RESULT", json.dumps(r), flush=True)
        rows.append(r)
    print(table(rows))
