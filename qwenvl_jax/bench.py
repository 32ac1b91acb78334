"""Train-step benchmark on synthetic batches: tokens/s, model TFLOP/s, MFU, peak device memory.

  python -m qwenvl_jax.bench --shape=ref8      # the PyTorch reference's shape (performance.md)
  python -m qwenvl_jax.bench --shape=full      # full Qwen-VL, batch 2 x 2048
  python -m qwenvl_jax.bench --shape=tiny      # CPU smoke test

`ref8` is the shape measured for the published PyTorch code on one H200: ViT-bigG at 448 px (48
layers) + the adapter + 8 Qwen-7B decoder layers, batch 4 x 2048 tokens, one image per sequence
(`<img>` + 256 + `</img>` inside the 2048), forward + backward without the optimizer update (the
reference's 17,576 tokens/s, 36.5 % MFU). `--mode=train` times the whole train step (AdamW update
included) instead. Model FLOPs follow qwenvl_jax.flops (the PaLM convention of performance.md).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qwenvl_jax import flops as flops_lib
from qwenvl_jax import train
from qwenvl_jax.data.random_batches import RandomBatches
from qwenvl_jax.train import stage_config

SHAPES = {
    # name: (model overrides, batch, seq_len, image_size, images per sequence)
    "ref8": (dict(num_hidden_layers=8), 4, 2048, 448, 1),
    "full": ({}, 2, 2048, 448, 1),
    "tiny": (None, 4, 128, 56, 1),
}

_SHAPE = flags.DEFINE_enum("shape", "ref8", sorted(SHAPES), "Benchmark shape.")
_MODE = flags.DEFINE_enum(
    "mode", "grad", ["grad", "train"], "grad: forward+backward only; train: full step."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REMAT = flags.DEFINE_string(
    "remat", "none", "Remat policy for both towers (layers.REMAT_POLICIES)."
)
_ATTN = flags.DEFINE_string("attn_impl", "", "Attention implementation; default cudnn on GPU.")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the shape's batch size.")
_CHIP = flags.DEFINE_string(
    "chip", "", "Chip name for MFU (h100, h200, v5p, ...); default guessed."
)
_JSON = flags.DEFINE_string("json_out", "", "Also write the result as JSON here.")


def bench_config(shape: str, mode: str, remat: str, attn_impl: str, batch: int = 0):
    """A multitask-stage config with the benchmark's shape (single device, no accumulation)."""
    overrides, b, t, size, m = SHAPES[shape]
    c = stage_config.load("multitask:tiny" if overrides is None else "multitask")
    if overrides is not None:
        c.model.overrides.update(overrides)
        c.model.dtype = "bfloat16"
    c.model.remat_llm = c.model.remat_vit = remat
    c.model.attn_impl = attn_impl
    c.batch_size = batch or b
    c.grad_accum = 1
    c.device_batch = 0
    c.data.seq_len, c.data.image_size, c.data.max_images = t, size, m
    c.data.kind = "random"
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, -1, 1
    c.optim.freeze = ()
    c.steps = 1000
    c.optim.warmup_steps = 10
    c.init.allow_random = True
    c.sharding.max_replicated_mb = 1e9
    return c


def run(shape="tiny", mode="grad", steps=3, warmup=1, remat="none", attn_impl="", batch=0, chip=""):
    """Compiles and times `steps` steps; returns a dict of results."""
    dev = jax.devices()[0]
    if not attn_impl:
        attn_impl = "cudnn" if dev.platform == "gpu" else "xla"
    c = bench_config(shape, mode, remat, attn_impl, batch)
    s = train.build(c, jax.devices()[:1])
    params = train.init_params(s, 0)
    data = RandomBatches(c, s.mcfg, int(c.batch_size), 0)
    batch_arr = train.to_step_batch(next(data), s)
    if mode == "train":
        opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
        fn = train.make_train_step(s)

        def step(p, o):
            return fn(p, o, batch_arr)
    else:

        def loss_fn(p, mb):
            model = train.merge_model(s, p)
            loss, n, _ = train.cross_entropy_sum(model, mb, int(c.get("loss_chunk", 0) or 0))
            return loss / jnp.maximum(n, 1.0)

        grad = jax.jit(jax.value_and_grad(loss_fn))
        mb = jax.tree.map(lambda x: x[0], batch_arr)
        opt = None

        def step(p, o):
            loss, g = grad(p, mb)
            return p, o, {"loss": loss, "g": jax.tree.leaves(g)[0]}

    t0 = time.time()
    params, opt, m = step(params, opt)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    for _ in range(warmup):
        params, opt, m = step(params, opt)
    jax.block_until_ready(m)
    t0 = time.time()
    for _ in range(steps):
        params, opt, m = step(params, opt)
    jax.block_until_ready(m)
    dt = (time.time() - t0) / steps
    f = flops_lib.step_flops(
        s.mcfg,
        sequences=int(c.batch_size),
        seq_len=int(c.data.seq_len),
        images=int(c.batch_size) * int(c.data.max_images),
        image_size=int(c.data.image_size),
    )
    peak = flops_lib.chip_peak(chip or None, dev.device_kind)
    stats = dev.memory_stats() or {}
    out = dict(
        shape=shape,
        mode=mode,
        device=dev.device_kind,
        attn_impl=attn_impl,
        remat=remat,
        batch=int(c.batch_size),
        seq_len=int(c.data.seq_len),
        image_size=int(c.data.image_size),
        compile_s=compile_s,
        step_s=dt,
        tokens_per_s=c.batch_size * c.data.seq_len / dt,
        images_per_s=c.batch_size * c.data.max_images / dt,
        model_tflop_per_step=f / 1e12,
        model_tflops_per_s=f / dt / 1e12,
        mfu=(f / dt / (peak * 1e12)) if peak else None,
        peak_memory_gb=stats.get("peak_bytes_in_use", 0) / 1e9 if stats else None,
        loss=float(np.asarray(m["loss"])),
    )
    return out


def main(argv):
    del argv
    r = run(
        _SHAPE.value, _MODE.value, _STEPS.value, _WARMUP.value, _REMAT.value, _ATTN.value,
        _BATCH.value, _CHIP.value,
    )  # fmt: skip
    print(
        f"{r['shape']} ({r['mode']}) on {r['device']}: {r['step_s']:.3f} s/step, "
        f"{r['tokens_per_s']:,.0f} tokens/s, {r['images_per_s']:.1f} images/s, "
        f"{r['model_tflops_per_s']:.1f} model TFLOP/s"
        + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
        + (f", peak {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] else "")
        + f" (compile {r['compile_s']:.0f} s)"
    )
    if r["shape"] == "ref8":
        print("PyTorch reference, H200, same shape: 0.466 s/step, 17,576 tokens/s, MFU 36.5 %")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    app.run(main)
