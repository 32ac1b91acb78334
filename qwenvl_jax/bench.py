"""Train-step benchmark on synthetic batches: tokens/s, model TFLOP/s, MFU, peak device memory.

  python -m qwenvl_jax.bench --shape=ref8      # the PyTorch reference's shape (docs/performance.md)
  python -m qwenvl_jax.bench --shape=full      # full Qwen-VL, batch 2 x 2048
  python -m qwenvl_jax.bench --shape=tiny      # CPU smoke test
  python -m qwenvl_jax.bench --shape=demo --mode=train --images_filled=3 --attn_impl=xla,jax
                                               # the demo's stage-2 step on a CPU, A/B
  python -m qwenvl_jax.bench --shape=ref8 --reference_dir=/path/to/Qwen-VL-Chat \
      --reference_python=/path/to/torch-venv/bin/python   # ours and the published PyTorch step

`ref8` is the shape measured for the published PyTorch code on one H200: ViT-bigG at 448 px (48
layers) + the adapter + 8 Qwen-7B decoder layers, batch 4 x 2048 tokens, one image per sequence
(`<img>` + 256 + `</img>` inside the 2048), forward + backward without the optimizer update (the
reference's 17,576 tokens/s, 36.5 % MFU). `--mode=train` times the whole train step (AdamW update
included) instead. Model FLOPs follow qwenvl_jax.flops (the PaLM convention of docs/performance.md).

A/B in one invocation: `--attn_impl=auto,xla --remat=full,dots` runs every combination and prints
tokens/s and the ratio to the first. Image work: `--image_slots=4 --images_filled=1
--image_budget=0,4` times 4 static slots per sequence with one picture each, encoding every slot
(0) against encoding only the valid ones (a budget of 4 = one per sequence at batch 4); MFU is
printed counting the encoded images and counting the real ones.

Side by side: `--reference_dir` (a directory holding the published code: modeling_qwen.py,
visual.py, configuration_qwen.py, qwen_generation_utils.py; never part of this repository) first
times the published PyTorch step at the same shape, in a subprocess of `--reference_python` (an
environment with torch, transformers==4.37.2, einops; default this interpreter) running
bench_reference.py: the same config.json numbers, batch, tokens and pictures per row, random
weights, bf16 for ref8/full (float32 for tiny_ref), on CUDA when there is one, the same --mode
(grad, or train with torch AdamW), --steps and --warmup. Then ours runs, and it prints both
tokens/s, MFU with the same FLOP formula, the parameter counts and the ratio ours / published. The
reference has no packing, remat or flash attention: each row is one causal sequence. `tiny_ref` is
the CPU-sized shape it can build (the tiny model with the published 256 adapter queries).

`--mode=decode` times generation instead (random weights of the shape's model, text prompts of
`--prompt_len` ids, `--new_tokens` greedy tokens per row, eos never emitted): tokens/s at each of
`--decode_batches` with the on-device loop (`generate.generate`), and at batch 1 the ratio to the
earlier Python loop of one compiled step per token (`generate.generate_stepwise`).

`--suite=device` runs all of these that a lent GPU should measure, in one call (bench_suite.py:
ref8 and full beside the published step, decode, the attention and remat A/B, the serving
benchmark), and writes one JSON and one markdown table; `--tiny` runs it at CPU sizes. Every mode
applies the trainer's compiler flags and GPU memory share first (qwenvl_jax/compiler.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qwenvl_jax import bench_reference, cli, compiler, train
from qwenvl_jax import flops as flops_lib
from qwenvl_jax.config import get_preset
from qwenvl_jax.data.batch import real_work
from qwenvl_jax.data.random_batches import RandomBatches
from qwenvl_jax.errors import ConfigError, MissingPathError, UserError
from qwenvl_jax.serve import bench as serve_bench  # defines the --mode=serve flags
from qwenvl_jax.train import stage_config
from qwenvl_jax.train.state import encoded_images, model_config
from qwenvl_jax.train.step import image_budget_of

SHAPES = {
    # name: (stage config, model overrides, batch, seq_len, image_size, images per sequence)
    "ref8": ("multitask", dict(num_hidden_layers=8), 4, 2048, 448, 1),
    "full": ("multitask", {}, 2, 2048, 448, 1),
    "tiny": ("multitask:tiny", {}, 4, 128, 56, 1),
    # The tiny model with the 256 adapter queries the published code hard-codes (multitask:tiny
    # has 16), so the reference can build it; one row, long enough for `<img>` + 256 + `</img>`
    # in the first of its two packed halves (random_batches.py).
    "tiny_ref": ("multitask:tiny", dict(visual=dict(n_queries=256)), 1, 528, 56, 1),
    # The default demo's stage-2 step (qwenvl_jax.demo.run; None: its model): 8 rows of 512
    # tokens, up to 4 pictures of 112 px per row (`--images_filled=3` is its typical row).
    "demo": ("multitask:tiny", None, 8, 512, 112, 4),
}


def _demo_model() -> dict:
    """The default demo's model (`qwenvl_jax.demo.run.SETTINGS["default"].model`, which sits above
    this module; tests/train/test_bench.py checks the two agree) with its 640-token vocabulary."""
    visual = dict(width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=128, patch_size=14)
    visual.update(n_queries=36, image_start_id=600)  # random rows: any id in the vocabulary
    return dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32,
        intermediate_size=512, initializer_range=0.08, vocab_size=640, visual=visual,
    )  # fmt: skip


_SHAPE = flags.DEFINE_enum("shape", "ref8", sorted(SHAPES), "Benchmark shape.")
_MODE = flags.DEFINE_enum(
    "mode",
    "grad",
    ["grad", "train", "decode", "serve"],
    "grad: forward+backward only; train: full step; decode: generation tokens/s; serve: the"
    " HTTP server under load (qwenvl_jax/serve/bench.py).",
)
_BATCHES = flags.DEFINE_list("decode_batches", ["1", "32"], "decode: batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "decode: prompt ids per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "decode: generated tokens per row.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REMAT = flags.DEFINE_list(
    "remat", ["none"], "Remat policies for both towers (layers.REMAT_POLICIES); a list runs an A/B."
)
_ATTN = flags.DEFINE_list(
    "attn_impl",
    [stage_config.base().model.attn_impl],
    "Attention implementations (model/attention.py); a list runs an A/B.",
)
_SLOTS = flags.DEFINE_integer(
    "image_slots",
    0,
    "Static image slots per sequence (0: the shape's); only the first"
    " --images_filled hold a picture.",
)
_SIZE = flags.DEFINE_integer("image_size", 0, "Override the shape's image resolution (pixels).")
_FILLED = flags.DEFINE_integer("images_filled", 1, "Pictures per sequence (with --image_slots).")
_BUDGETS = flags.DEFINE_list(
    "image_budget",
    ["0"],
    "config.data.image_budget values (0: encode every slot); a list runs"
    " an A/B, e.g. --image_slots=4 --image_budget=0,4 (1 of 4 slots filled, batch 4).",
)
_BATCH = flags.DEFINE_integer("batch", 0, "Override the shape's batch size.")
_CHIP = flags.DEFINE_string(
    "chip", "", "Chip name for MFU (h100, h200, v5p, ...); default guessed."
)
_JSON = flags.DEFINE_string("json_out", "", "Also write the result as JSON here.")
_REF_DIR = flags.DEFINE_string(
    "reference_dir",
    "",
    "A directory holding the published PyTorch Qwen-VL code (modeling_qwen.py, visual.py, ...):"
    " also time its step at the same shape and print the ratio.",
)
_SUITE = flags.DEFINE_enum(
    "suite",
    "",
    ["", "device"],
    "device: every benchmark a lent GPU should run, one subprocess each (bench_suite.py); the"
    " shape, mode and A/B flags above are then the suite's.",
)
_TINY = flags.DEFINE_bool("tiny", False, "--suite at CPU sizes (the tiny model).")
_SUITE_OUT = flags.DEFINE_string(
    "suite_out", "device_suite", "--suite: folder for device_suite.json and device_suite.md."
)
_SUITE_BUDGET = flags.DEFINE_float(
    "suite_budget_s", 540.0, "--suite: seconds for all items; later items are skipped past it."
)
_SUITE_ONLY = flags.DEFINE_list("suite_items", [], "--suite: run only these items (default all).")
_GPU_MEM = flags.DEFINE_float(
    "gpu_memory_fraction",
    compiler.GPU_MEMORY_FRACTION,
    "Share of GPU memory JAX takes (XLA_PYTHON_CLIENT_MEM_FRACTION, unless already set).",
)
_REF_PY = flags.DEFINE_string(
    "reference_python",
    "",
    "The Python of the environment with torch and transformers for --reference_dir"
    " (default: this interpreter).",
)

# What the reference needs in its environment (the published files import these).
REFERENCE_PACKAGES = ("torch", "transformers", "einops", "PIL", "requests", "numpy")
REFERENCE_PIP = "torch transformers==4.37.2 einops tiktoken pillow requests numpy"
_PROBE = "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if not u.find_spec(m)])"


def bench_config(
    shape: str, mode: str, remat: str, attn_impl: str = "", batch: int = 0, image_slots: int = 0,
    image_budget: int = 0,
    image_size: int = 0,
):  # fmt: skip
    """A multitask-stage config with the benchmark's shape (single device, no accumulation);
    `attn_impl` "" keeps the stage config's."""
    stage, overrides, b, t, size, m = SHAPES[shape]
    overrides = _demo_model() if overrides is None else overrides
    m, size = image_slots or m, image_size or size
    c = stage_config.load(stage)
    for key, value in overrides.items():
        if isinstance(value, dict):
            c.model.overrides[key].update(value)
        else:
            c.model.overrides[key] = value
    if not stage.endswith(":tiny"):
        c.model.dtype = "bfloat16"
    c.model.remat_llm = c.model.remat_vit = remat
    if attn_impl:
        c.model.attn_impl = attn_impl
    c.batch_size = batch or b
    c.grad_accum = 1
    c.device_batch = 0
    c.data.seq_len, c.data.image_size, c.data.max_images = t, size, m
    c.data.image_budget = image_budget
    c.data.kind = "random"
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, -1, 1
    c.optim.freeze = ()
    c.steps = 1000
    c.optim.warmup_steps = 10
    c.init.allow_random = True
    c.sharding.max_replicated_mb = 1e9
    return c


def _host_batch(c, mcfg, images_filled: int) -> dict:
    """Random rows with `images_filled` pictures each in `data.max_images` slots (the rest empty:
    zero pixels, image_valid False)."""
    m = int(c.data.max_images)
    filled = min(images_filled, m) if m else 0
    gen_cfg = c.copy_and_resolve_references()
    gen_cfg.data.max_images = filled
    local = next(RandomBatches(gen_cfg, mcfg, int(c.batch_size), 0))
    if m > filled:
        b, size = int(c.batch_size), int(c.data.image_size)
        local["images"] = np.concatenate(
            [local.get("images", np.zeros((b, 0, size, size, 3), np.float32)),
             np.zeros((b, m - filled, size, size, 3), np.float32)], axis=1)  # fmt: skip
        local["image_valid"] = np.concatenate(
            [local.get("image_valid", np.zeros((b, 0), bool)), np.zeros((b, m - filled), bool)],
            axis=1,
        )
    return local


def run(
    shape="tiny", mode="grad", steps=3, warmup=1, remat="none", attn_impl="", batch=0, chip="",
    image_slots=0, images_filled=1, image_budget=0, image_size=0,
):  # fmt: skip
    """Compiles and times `steps` steps; returns a dict of results.

    `image_slots` > 0 gives every sequence that many static image slots of which the first
    `images_filled` hold a picture; `image_budget` is `config.data.image_budget`; `attn_impl` ""
    is the stage config's.
    """
    dev = jax.devices()[0]
    c = bench_config(shape, mode, remat, attn_impl, batch, image_slots, image_budget, image_size)
    s = train.build(c, jax.devices()[:1])
    params = train.init_params(s, 0)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    local = _host_batch(c, s.mcfg, images_filled if image_slots else int(c.data.max_images))
    real_images = float(np.sum(local.get("image_valid", 0)))
    batch_arr = train.to_step_batch(local, s)
    budget, groups = image_budget_of(s)
    if mode == "train":
        opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
        fn = train.make_train_step(s)

        def step(p, o):
            return fn(p, o, batch_arr)
    else:

        def loss_fn(p, mb):
            model = train.merge_model(s, p)
            loss, n, _ = train.cross_entropy_sum(model, mb, int(c.loss_chunk), budget, groups)
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
    kw = dict(sequences=int(c.batch_size), seq_len=int(c.data.seq_len),
              image_size=int(c.data.image_size))  # fmt: skip
    f = flops_lib.step_flops(s.mcfg, images=encoded_images(s), **kw)
    f_real = flops_lib.step_flops(s.mcfg, images=real_images, **kw)
    work = real_work(local)  # goodput: non-padding tokens, attention within samples, valid images
    f_work = flops_lib.work_flops(
        s.mcfg, tokens=work["tokens"], attended=work["attended"], images=work["images"],
        image_size=int(c.data.image_size),
    )  # fmt: skip
    peak = flops_lib.chip_peak(chip or None, dev.device_kind)
    stats = dev.memory_stats() or {}
    out = dict(
        shape=shape,
        mode=mode,
        device=dev.device_kind,
        attn_impl=c.model.attn_impl,
        remat=remat,
        batch=int(c.batch_size),
        seq_len=int(c.data.seq_len),
        image_size=int(c.data.image_size),
        compile_s=compile_s,
        step_s=dt,
        tokens_per_s=c.batch_size * c.data.seq_len / dt,
        image_slots=int(c.data.max_images),
        image_budget=int(c.data.image_budget),
        images_per_s=real_images / dt,
        model_tflop_per_step=f / 1e12,
        model_tflops_per_s=f / dt / 1e12,
        model_tflops_per_s_real_images=f_real / dt / 1e12,
        mfu=(f / dt / (peak * 1e12)) if peak else None,
        mfu_real_images=(f_real / dt / (peak * 1e12)) if peak else None,
        real_tokens_per_s=work["tokens"] / dt,
        real_token_fraction=work["tokens"] / work["positions"],
        model_tflops_per_s_real=f_work / dt / 1e12,
        mfu_real=(f_work / dt / (peak * 1e12)) if peak else None,
        peak_memory_gb=stats.get("peak_bytes_in_use", 0) / 1e9 if stats else None,
        loss=float(np.asarray(m["loss"])),
        params=n_params,
    )
    return out


def check_reference(reference_dir: str, python: str) -> str:
    """Raises a one-line UserError unless `reference_dir` holds the published model code and
    `python` imports what it needs; returns the interpreter's path."""
    code = "it must hold the published Qwen-VL code: " + ", ".join(bench_reference.REFERENCE_FILES)
    if not os.path.isdir(reference_dir):
        raise MissingPathError(f"--reference_dir={reference_dir} is not a directory ({code})")
    missing = [
        f for f in bench_reference.REFERENCE_FILES
        if not os.path.isfile(os.path.join(reference_dir, f))
    ]  # fmt: skip
    if missing:
        raise MissingPathError(
            f"--reference_dir={reference_dir} has no {', '.join(missing)} (it must hold the"
            " published Qwen-VL code)"
        )
    exe = shutil.which(python) or python
    if not os.path.isfile(exe):
        raise MissingPathError(f"--reference_python={python} does not exist")
    probe = subprocess.run(
        [exe, "-c", _PROBE, *REFERENCE_PACKAGES], capture_output=True, text=True
    )  # fmt: skip
    missing = probe.stdout.split() if probe.returncode == 0 else ["python itself"]
    if missing:
        raise UserError(
            f"--reference_python={python} cannot import {', '.join(missing)}; install the"
            f" reference's packages there: {exe} -m pip install {REFERENCE_PIP}"
        )
    return exe


def reference_inputs(c, shape: str, images_filled: int) -> tuple[dict, list[int]]:
    """The HF config.json dict of the benchmark's model and the pictures in each row of its batch
    (as `run` builds it), for the published code; a ConfigError when that code cannot build the
    same model."""
    mcfg = model_config(c)
    hf = mcfg.to_hf_dict()
    # to_hf_dict writes the values the published code hard-codes (256 adapter queries, ...) only
    # where they differ from them: any key beyond the published config.json's is a model the
    # published code would silently build differently.
    published = get_preset("qwen-vl-7b").to_hf_dict()
    extra = sorted(set(hf) - set(published)) + [
        f"visual.{k}" for k in sorted(set(hf["visual"]) - set(published["visual"]))
    ]
    if extra:
        values = ", ".join(f"{k}={hf.get(k, hf['visual'].get(k[7:]))}" for k in extra)
        raise ConfigError(
            f"--shape={shape} has {values}, which the published code"
            f" hard-codes differently; compare at --shape=tiny_ref, ref8 or full"
        )
    local = _host_batch(c, mcfg, images_filled)
    valid = local.get("image_valid", np.zeros((int(c.batch_size), 0), bool))
    return hf, [int(n) for n in valid.sum(axis=1)]


def run_reference(
    shape="tiny_ref", mode="grad", steps=3, warmup=1, batch=0, chip="", image_slots=0,
    images_filled=1, image_size=0, reference_dir="", python="",
):  # fmt: skip
    """Times the published PyTorch step at the benchmark's shape in a subprocess of `python`
    (bench_reference.py); returns its JSON result with model TFLOP/s and MFU added.

    The batch has as many pictures per row as `run`'s (`images_filled` with `image_slots`); the
    published code encodes only those. It has no remat, attention choice or sequence packing:
    each row is one causal sequence of `seq_len` tokens."""
    if mode not in ("grad", "train"):
        raise ConfigError(f"--reference_dir times --mode=grad or train, not --mode={mode}")
    exe = check_reference(reference_dir, python or sys.executable)
    c = bench_config(shape, mode, "none", "auto", batch, image_slots, 0, image_size)
    hf, per_row = reference_inputs(
        c, shape, images_filled if image_slots else int(c.data.max_images)
    )
    cmd = [
        exe, bench_reference.__file__, f"--reference_dir={reference_dir}",
        f"--config_json={json.dumps(hf)}", f"--batch={int(c.batch_size)}",
        f"--seq_len={int(c.data.seq_len)}", f"--images_per_row={','.join(map(str, per_row))}",
        f"--mode={mode}", f"--dtype={c.model.dtype}", f"--steps={steps}", f"--warmup={warmup}",
    ]  # fmt: skip
    # stderr (the reference's warnings, a traceback) goes to the terminal; stdout is the result.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise UserError(
            f"the published PyTorch step failed (exit {proc.returncode}, its error is above):"
            f" {exe} {bench_reference.__file__} --reference_dir={reference_dir} ..."
        )
    ref = json.loads(lines[-1])
    f = flops_lib.step_flops(
        model_config(c), sequences=ref["batch"], seq_len=ref["seq_len"],
        images=ref["images_per_step"], image_size=int(c.data.image_size),
    )  # fmt: skip
    peak = flops_lib.chip_peak(chip or None, ref["device"])
    ref.update(
        shape=shape,
        model_tflop_per_step=f / 1e12,
        model_tflops_per_s=f / ref["step_s"] / 1e12,
        mfu=(f / ref["step_s"] / (peak * 1e12)) if peak else None,
    )
    return ref


def _timed(fn, repeats: int = 2) -> float:
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.time()
        fn()
        best = min(best, time.time() - t0)
    return best


def run_decode(shape="tiny", batches=(1, 32), prompt_len=64, new_tokens=64) -> dict:
    """Generation tokens/s per batch size (prefill included), and the stepwise baseline at B=1."""
    from qwenvl_jax import api
    from qwenvl_jax import generate as gen
    from qwenvl_jax.model.factory import build_model
    from qwenvl_jax.model.options import ModelOptions

    cfg = model_config(bench_config(shape, "decode", "none"))
    model = build_model(cfg, None, ModelOptions.inference(api.default_dtype()))
    rng = np.random.default_rng(0)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=-1)  # -1: no row ever stops early
    out = {"shape": shape, "device": jax.devices()[0].device_kind, "new_tokens": new_tokens,
           "prompt_len": prompt_len, "tokens_per_s": {}}  # fmt: skip
    for b in batches:
        prompts = rng.integers(0, 150000, (b, prompt_len)).tolist()
        dt = _timed(lambda p=prompts: gen.generate(model, p, **kw))
        out["tokens_per_s"][b] = b * new_tokens / dt
    prompt = rng.integers(0, 150000, prompt_len).tolist()
    loop = _timed(lambda: gen.generate(model, prompt, **kw))
    step = _timed(lambda: gen.generate_stepwise(model, prompt, **kw))
    out["batch1_loop_s"], out["batch1_stepwise_s"] = loop, step
    out["speedup_vs_stepwise"] = step / loop
    return out


def main(argv):
    del argv  # cli.absl_main refuses positional words
    if not 0 < _GPU_MEM.value <= 1:
        raise ConfigError(f"--gpu_memory_fraction={_GPU_MEM.value} is not in (0, 1]")
    # The trainer's compiler flags and GPU memory share, before JAX starts its backends (the
    # suite's subprocesses inherit them).
    compiler.apply_flags(gpu_memory_fraction=_GPU_MEM.value)
    if _SUITE.value:
        from qwenvl_jax import bench_suite

        bench_suite.run_suite(
            _SUITE_OUT.value, _TINY.value, _SUITE_BUDGET.value, _REF_DIR.value, _REF_PY.value,
            tuple(_SUITE_ONLY.value),
        )  # fmt: skip
        return
    if _MODE.value == "serve":
        r = serve_bench.main()
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(r, f, indent=2)
        return
    if _REF_DIR.value and _MODE.value == "decode":
        raise ConfigError("--reference_dir times --mode=grad or train, not --mode=decode")
    if _MODE.value == "decode":
        batches = [int(b) for b in _BATCHES.value]
        r = run_decode(_SHAPE.value, batches, _PROMPT.value, _NEW.value)
        for b, tps in r["tokens_per_s"].items():
            print(
                f"{r['shape']} decode on {r['device']}, batch {b}: {tps:,.1f} tokens/s"
                f" ({r['prompt_len']}-token prompts, {r['new_tokens']} new, prefill included)"
            )
        print(
            f"batch 1: on-device loop {r['batch1_loop_s']:.3f} s, Python loop per token"
            f" {r['batch1_stepwise_s']:.3f} s: {r['speedup_vs_stepwise']:.2f}x"
        )
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(r, f, indent=2)
        return
    ref = None
    if _REF_DIR.value:
        # First, before JAX takes the accelerator's memory (the subprocess frees it on exit).
        ref = run_reference(
            _SHAPE.value, _MODE.value, _STEPS.value, _WARMUP.value, _BATCH.value, _CHIP.value,
            _SLOTS.value, _FILLED.value, _SIZE.value, _REF_DIR.value, _REF_PY.value,
        )  # fmt: skip
        print(_ref_line(ref), flush=True)
    results = []
    for attn in _ATTN.value:
        for remat in _REMAT.value:
            for budget in _BUDGETS.value:
                r = run(
                    _SHAPE.value, _MODE.value, _STEPS.value, _WARMUP.value, remat, attn,
                    _BATCH.value, _CHIP.value, _SLOTS.value, _FILLED.value, int(budget),
                    _SIZE.value,
                )  # fmt: skip
                results.append(r)
                print(_line(r), flush=True)
    if len(results) > 1:
        base = results[0]
        print(f"A/B against the first ({_label(base)}):")
        for r in results[1:]:
            print(f"  {_label(r)}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s")
    if ref is not None:
        print(f"ours / published PyTorch ({ref['device']}), same shape and batch:")
        for r in results:
            print(f"  {_label(r)}: {_vs_reference(r, ref)}")
    elif _SHAPE.value == "ref8":
        print("PyTorch reference, H200, same shape: 0.466 s/step, 17,576 tokens/s, MFU 36.5 %")
    if _JSON.value:
        out = results if len(results) > 1 else results[0]
        if ref is not None:
            out = dict(ours=out, reference=ref)
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=2)


def _ref_line(ref: dict) -> str:
    return (
        f"{ref['shape']} ({ref['mode']}) published PyTorch on {ref['device']}, torch"
        f" {ref['torch']}, transformers {ref['transformers']}, {ref['dtype']} weights:"
        f" {ref['step_s']:.3f} s/step, {ref['tokens_per_s']:,.0f} tokens/s,"
        f" {ref['images_per_step']} images/step, {ref['model_tflops_per_s']:.3g} model TFLOP/s"
        + (f", MFU {ref['mfu']:.1%}" if ref["mfu"] is not None else "")
        + (f", peak {ref['peak_memory_gb']:.1f} GB" if ref["peak_memory_gb"] else "")
        + f", {ref['params']:,} parameters"
    )


def _vs_reference(r: dict, ref: dict) -> str:
    out = (
        f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s ({r['tokens_per_s']:,.0f}"
        f" vs {ref['tokens_per_s']:,.0f})"
    )
    if r["mfu"] is not None and ref["mfu"] is not None:
        out += f", MFU {r['mfu']:.1%} vs {ref['mfu']:.1%}"
    if r["params"] != ref["params"]:
        out += f"; parameters differ: {r['params']:,} vs {ref['params']:,}"
    return out


def _label(r: dict) -> str:
    out = f"attn_impl={r['attn_impl']} remat={r['remat']}"
    if r["image_slots"] and r["image_budget"]:
        out += f" image_budget={r['image_budget']}"
    elif r["image_slots"]:
        out += " every slot"
    return out


def _line(r: dict) -> str:
    return (
        f"{r['shape']} ({r['mode']}) on {r['device']}, {_label(r)}: {r['step_s']:.3f} s/step, "
        f"{r['tokens_per_s']:,.0f} tokens/s ({r['real_tokens_per_s']:,.0f} real),"
        f" {r['images_per_s']:.1f} images/s"
        f" ({r['image_slots']} slots per sequence), {r['model_tflops_per_s']:.3g} model TFLOP/s"
        + (
            f", MFU {r['mfu']:.1%} (real images {r['mfu_real_images']:.1%}, real work"
            f" {r['mfu_real']:.1%})"
            if r["mfu"] is not None
            else ""
        )  # fmt: skip
        + (f", peak {r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] else "")
        + f", {r['params']:,} parameters (compile {r['compile_s']:.0f} s)"
    )


if __name__ == "__main__":
    cli.absl_main(main)
