"""Command line: convert Qwen-VL checkpoints between HF format and qwenvl_jax's own format.

  python -m qwenvl_jax.convert import HF_DIR OUT_DIR [--scan_layers] [--dtype float32]
      HF directory (model*.safetensors or pytorch_model*.bin shards, with or without an index,
      and config.json) -> our format (config.json + Orbax params/).
  python -m qwenvl_jax.convert export OURS_DIR OUT_DIR [--dtype bfloat16] [--max_shard_size 2GB]
      our format -> HF directory (safetensors shards + index, config.json,
      generation_config.json, qwen.tiktoken, tokenizer_config.json) that the published PyTorch
      code loads; --code_dir copies the published *.py files from a directory you point to.
  python -m qwenvl_jax.convert import-llm QWEN7B_DIR OUT_DIR [--scan_layers] [--dtype ...]
      text-only HF Qwen (Qwen-7B) -> a decoder-only tower checkpoint (our format) for stage 1's
      --config.init.llm_checkpoint.
  python -m qwenvl_jax.convert import-vit OPENCLIP_FILE OUT_DIR [--heads 16] [--dtype ...]
      OpenCLIP ViT (ViT-bigG-14: open_clip_pytorch_model.bin or .safetensors) -> a ViT-trunk tower
      checkpoint (our format) for stage 1's --config.init.vit_checkpoint. The class token and
      OpenCLIP's ln_post/proj are dropped, the text tower is ignored (both reported).

Neither direction needs torch. Progress is printed per shard.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time

DTYPES = ("keep", "float32", "bfloat16", "float16")


def _dtype(name: str):
    if name == "keep":
        return None
    import ml_dtypes
    import numpy as np

    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qwenvl_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("import", help="HF Qwen-VL directory -> qwenvl_jax checkpoint")
    pi.add_argument("src", help="HF checkpoint directory (config.json + weight shards)")
    pi.add_argument("out", help="output directory (config.json + params/)")
    pe = sub.add_parser("export", help="qwenvl_jax checkpoint -> HF Qwen-VL directory")
    pe.add_argument("src", help="a directory written by `import` or by save_params")
    pe.add_argument("out", help="output HF directory")
    pe.add_argument("--dtype", choices=DTYPES, default="keep", help="cast the weights")
    pe.add_argument("--max_shard_size", default="2GiB", help="e.g. 2GiB, 500MB, or bytes")
    pe.add_argument("--no_tokenizer", action="store_true", help="write no tokenizer files")
    pe.add_argument(
        "--code_dir",
        default=None,
        help="copy the published *.py files (modeling_qwen.py, ...) from this directory, so that"
        " transformers can load the export with trust_remote_code",
    )
    pl = sub.add_parser("import-llm", help="text-only HF Qwen (Qwen-7B) -> decoder-only tower")
    pl.add_argument("src", help="HF Qwen directory (config.json without 'visual' + weights)")
    pl.add_argument("out", help="output directory (config.json + params/ + tower.json)")
    pv = sub.add_parser("import-vit", help="OpenCLIP ViT (ViT-bigG-14) -> ViT-trunk tower")
    pv.add_argument("src", help="open_clip_pytorch_model.bin / .safetensors (or its directory)")
    pv.add_argument("out", help="output directory (config.json + params/ + tower.json)")
    pv.add_argument("--heads", type=int, default=16, help="ViT heads (16 for ViT-bigG-14)")
    for imp in (pi, pl, pv):
        imp.add_argument("--scan_layers", action="store_true", help="store stacked layers")
        imp.add_argument("--dtype", choices=DTYPES, default="keep", help="cast the weights")
    args = p.parse_args(argv)
    if args.command in ("import-llm", "import-vit"):
        return _import_tower(p, args)

    from qwenvl_jax.convert import export_hf, import_hf, load_params, save_params

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    if args.command == "import":
        if os.path.exists(os.path.join(args.out, "params")):
            p.error(f"{args.out}/params exists; choose an empty output directory")
        log(f"importing {args.src}")
        cfg, params = import_hf(
            args.src, scan_layers=args.scan_layers, dtype=_dtype(args.dtype), progress=log
        )
        log(f"saving to {args.out}")
        save_params(args.out, params, cfg)
    else:
        log(f"loading {args.src}")
        cfg, params = load_params(args.src)
        log(f"exporting to {args.out}")
        written = export_hf(
            params,
            cfg,
            args.out,
            dtype=_dtype(args.dtype),
            max_shard_bytes=_size(args.max_shard_size),
            tokenizer=None if args.no_tokenizer else "default",
            progress=log,
        )
        if args.code_dir:
            files = sorted(glob.glob(os.path.join(args.code_dir, "*.py")))
            if not files:
                p.error(f"--code_dir {args.code_dir} holds no .py files")
            for f in files:
                shutil.copy(f, args.out)
            written += files
        log(f"wrote {len(written)} files")
    log(f"done in {time.time() - t0:.1f} s")
    return 0


def _import_tower(p: argparse.ArgumentParser, args) -> int:
    """`import-llm` / `import-vit`: one stage-1 tower in our format, plus tower.json."""
    from qwenvl_jax.convert import openclip, qwen_llm, save_params

    def log(msg: str) -> None:
        print(msg, flush=True)

    if os.path.exists(os.path.join(args.out, "params")):
        p.error(f"{args.out}/params exists; choose an empty output directory")
    t0 = time.time()
    log(f"importing {args.src}")
    if args.command == "import-llm":
        cfg, params = qwen_llm.import_qwen_llm(
            args.src, scan_layers=args.scan_layers, dtype=_dtype(args.dtype), progress=log
        )
        info = {"tower": "llm", "source": os.path.abspath(args.src)}
    else:
        cfg, params, report = openclip.import_openclip(
            args.src,
            heads=args.heads,
            scan_layers=args.scan_layers,
            dtype=_dtype(args.dtype),
            progress=log,
        )
        info = {"tower": "vit", "source": os.path.abspath(args.src), **report}
    log(f"saving to {args.out}")
    save_params(args.out, params, cfg)
    qwen_llm.write_tower_json(args.out, info)
    log(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
