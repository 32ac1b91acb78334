"""The published PyTorch Qwen-VL train step at a given shape (the reference side of the bench).

Runs in the environment that holds torch (torch is not a dependency of qwenvl_jax), so it imports
only the standard library, torch, and the published code of `--reference_dir` (modeling_qwen.py,
visual.py, configuration_qwen.py, qwen_generation_utils.py, which import transformers and einops);
never qwenvl_jax. `python -m qwenvl_jax.bench --reference_dir=...` starts it as a script with
`--reference_python`; by hand::

  /path/to/torch-venv/bin/python qwenvl_jax/bench_reference.py \
      --reference_dir=/path/to/Qwen-VL-Chat --config_json="$(cat config.json)" \
      --batch=4 --seq_len=2048 --images_per_row=1,1,1,1

What it times: QWenLMHeadModel built from `--config_json` (the HF config.json keys) with the
published code's random initialisation, bf16 weights (`--dtype=bfloat16`, the published `bf16`
switch) or float32, in training mode, on CUDA when available (else the CPU). Each row is `[<img>
+ 256 positions + </img>] x images, then text`; labels = inputs. The images are tensors: the
published forward reads an image path out of the ids inside each span and calls `visual.encode`,
which here is replaced by a lookup of that name in a tensor of random pixels, so no file is read
and no PIL resize is timed (as in docs/performance.md). `--mode=grad` is forward + backward, `train`
adds `torch.optim.AdamW` (gradients clipped at norm 1). Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import types

# The files the published model imports (the tokenizer is not needed here).
REFERENCE_FILES = (
    "modeling_qwen.py",
    "visual.py",
    "configuration_qwen.py",
    "qwen_generation_utils.py",
)


def _torchvision_or_stand_in() -> str:
    """Makes `from torchvision import transforms` work; returns what was used.

    visual.py only builds its PIL preprocessing from torchvision.transforms, which this benchmark
    never calls (it feeds tensors). torchvision wheels built against another torch fail to
    register their C++ ops, so those registrations are skipped; without torchvision at all, a
    stand-in module with the four names visual.py reads takes its place."""
    sys.modules.setdefault(
        "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
    )
    try:
        importlib.import_module("torchvision.transforms")
        return "torchvision"
    except Exception:  # noqa: BLE001 - any import failure: fall back to the stand-in
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def unused(*args, **kwargs):
        return None

    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = transforms.Resize = transforms.ToTensor = transforms.Normalize = unused
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    tv = types.ModuleType("torchvision")
    tv.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, transforms
    return "stand-in"


def import_reference(reference_dir: str):
    """The published modules, imported as the package `qwen_reference` (they import relatively)."""
    missing = [f for f in REFERENCE_FILES if not os.path.isfile(os.path.join(reference_dir, f))]
    if missing:
        raise SystemExit(f"error: --reference_dir={reference_dir} lacks {', '.join(missing)}")
    link_root = tempfile.mkdtemp(prefix="qwen_reference_")
    atexit.register(shutil.rmtree, link_root, ignore_errors=True)
    os.symlink(os.path.abspath(reference_dir), os.path.join(link_root, "qwen_reference"))
    sys.path.insert(0, link_root)
    return types.SimpleNamespace(
        modeling=importlib.import_module("qwen_reference.modeling_qwen"),
        configuration=importlib.import_module("qwen_reference.configuration_qwen"),
    )


def make_inputs(torch, hf: dict, batch: int, seq_len: int, images_per_row: list[int], device):
    """ids [B, T] with the image spans first in each row, and the image names they carry.

    The published forward finds each `<img>` (image_start_id) and `</img>` (+1), takes the ids
    between them up to the first pad (+2) as the UTF-8 bytes of an image path, and writes the
    encoded image into the 256 positions after `<img>`. The name here is the image's row-major
    index into the pixel tensor."""
    start = int(hf["visual"]["image_start_id"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (batch, seq_len), generator=gen)
    n = 0
    for r, m in enumerate(images_per_row):
        p = 0
        for _ in range(m):
            if p + 258 > seq_len:
                raise SystemExit(f"error: {m} image spans of 258 ids do not fit in {seq_len}")
            name = list(str(n).encode())
            ids[r, p] = start
            ids[r, p + 1 : p + 257] = start + 2
            ids[r, p + 1 : p + 1 + len(name)] = torch.tensor(name)
            ids[r, p + 257] = start + 1
            p += 258
            n += 1
    return ids.to(device), n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference_dir", required=True)
    ap.add_argument("--config_json", required=True, help="the HF config.json dict, as JSON text")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq_len", type=int, required=True)
    ap.add_argument("--images_per_row", default="", help="comma list, one count per row")
    ap.add_argument("--mode", choices=["grad", "train"], default="grad")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    args = ap.parse_args(argv)
    # Started as a script, Python puts this file's folder (the qwenvl_jax package) first on
    # sys.path, where our config.py, image.py, metrics.py ... would shadow modules of the torch env.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    import torch

    tv = _torchvision_or_stand_in()
    ref = import_reference(args.reference_dir)
    import transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    counts = [int(x) for x in args.images_per_row.split(",") if x] or [0] * args.batch
    if len(counts) != args.batch:
        raise SystemExit(f"error: --images_per_row has {len(counts)} counts for batch {args.batch}")

    hf = json.loads(args.config_json)
    hf.update(bf16=args.dtype == "bfloat16", fp16=False, fp32=args.dtype == "float32")
    # This copy of the published code has no flash-attention path; it materialises the scores.
    hf["use_flash_attn"] = False
    cfg = ref.configuration.QWenConfig(**hf)
    t0 = time.time()
    torch.manual_seed(0)
    with device:  # random init directly on the device (a 7B float32 init on the host is slow)
        model = ref.modeling.QWenLMHeadModel(cfg)
    model.to(device).train()
    build_s = time.time() - t0
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    ids, n_images = make_inputs(torch, hf, args.batch, args.seq_len, counts, device)
    size = int(hf["visual"]["image_size"])
    dtype = next(model.transformer.visual.parameters()).dtype
    pixels = torch.randn(max(n_images, 1), 3, size, size, device=device, dtype=dtype)
    visual = model.transformer.visual
    encoded = []

    def encode(names):  # replaces the file/URL reader: the names index `pixels`
        encoded.append(len(names))
        return visual(pixels[[int(s) for s in names]])

    visual.encode = encode
    opt = None
    if args.mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    loss = step()  # the first step allocates (and, on CUDA, picks kernels): timed apart
    sync()
    first_s = time.time() - t0
    for _ in range(args.warmup):
        loss = step()
    sync()
    encoded.clear()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.time() - t0) / max(args.steps, 1)
    out = dict(
        impl="published PyTorch (modeling_qwen.QWenLMHeadModel)",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        torchvision=tv,
        dtype=args.dtype,
        mode=args.mode,
        batch=args.batch,
        seq_len=args.seq_len,
        params=params,
        trainable_params=trainable,
        images_per_step=encoded[0] if encoded else 0,
        build_s=build_s,
        first_step_s=first_s,
        step_s=dt,
        tokens_per_s=args.batch * args.seq_len / dt,
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "cuda"
        else None,
        loss=float(loss.detach().float()),
    )
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
