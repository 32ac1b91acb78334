"""Command line: convert Qwen-VL checkpoints between HF format and qwenvl_jax's own format.

  python -m qwenvl_jax.convert import HF_DIR OUT_DIR [--scan_layers] [--dtype=float32]
      HF directory (model*.safetensors or pytorch_model*.bin shards, with or without an index,
      and config.json) -> our format (config.json + Orbax params/).
  python -m qwenvl_jax.convert export SRC_DIR OUT_DIR [--dtype=bfloat16] [--max_shard_size=2GB]
      our format (config.json + params/), or a training workdir (config.json +
      checkpoints/<step>/: its latest complete step, or --step=N) -> HF directory (safetensors
      shards + index, config.json, generation_config.json, qwen.tiktoken, tokenizer_config.json)
      that the published PyTorch code loads; SRC_DIR and OUT_DIR may be gs:// paths; --code_dir
      copies the published *.py files from a directory you point to. A LoRA workdir
      (configs/sft.py:lora) exports merged onto its config.init weights, or with --peft as a PEFT
      adapter (adapter_config.json + adapter_model.safetensors).
  python -m qwenvl_jax.convert import-llm QWEN7B_DIR OUT_DIR [--scan_layers] [--dtype=...]
      text-only HF Qwen (Qwen-7B) -> a decoder-only tower checkpoint (our format) for stage 1's
      --config.init.llm_checkpoint.
  python -m qwenvl_jax.convert import-vit OPENCLIP_FILE OUT_DIR [--heads=16] [--dtype=...]
      OpenCLIP ViT (ViT-bigG-14: open_clip_pytorch_model.bin or .safetensors) -> a ViT-trunk tower
      checkpoint (our format) for stage 1's --config.init.vit_checkpoint. The class token and
      OpenCLIP's ln_post/proj are dropped, the text tower is ignored (both reported).

Neither direction needs torch. Progress is printed per shard. `python -m qwenvl_jax.convert COMMAND
--help` lists a command's flags; a mistake is one line `error: ...`, exit 2 (`qwenvl_jax.cli`).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from qwenvl_jax import cli, fileio
from qwenvl_jax import config as config_lib
from qwenvl_jax.errors import ConfigError, MissingPathError, UserError

DTYPES = ("keep", *config_lib.DTYPES)
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _dtype(name: str):
    if name == "keep":
        return None
    return config_lib.dtype_from_name(name, "--dtype")


def _size(text: str) -> int:
    """`--max_shard_size`: bytes, or a number with a unit (2GiB, 500MB)."""
    t = text.strip().upper()
    try:
        for u, m in sorted(SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
            if t.endswith(u):
                n = int(float(t[: -len(u)]) * m)
                break
        else:
            n = int(t)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes or a number with one of"
            f" {', '.join(u.replace('I', 'i') for u in SIZE_UNITS)} (e.g. 2GiB)"
        )
    return n


def _step(text: str) -> int:
    """`--step`: a non-negative integer."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a step: give a non-negative integer")
    return int(text)


def _one_line(e: BaseException) -> str:
    """An error's message on one line: the first line, then at most 5 of the listed problems."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    head, rest = lines[0], [x for x in lines[1:] if not x.startswith("... and")]
    if not rest:
        return head
    more = f"; ... ({len(rest) - 5} more)" if len(rest) > 5 else ""
    return f"{head}{'' if head.endswith(':') else ':'} {'; '.join(rest[:5])}{more}"


def _check_out(out: str) -> None:
    """The output directory: absent, or a directory without params/ (import never overwrites)."""
    if fileio.exists(out) and not fileio.isdir(out):
        raise UserError(f"output {out} is a file; give a directory")
    if fileio.exists(fileio.join(out, "params")):
        raise UserError(f"output {out} already holds params/; choose a new or empty directory")


def main(argv: list[str] | None = None) -> int:
    """The command line (`qwenvl_jax.cli`'s convention: a user mistake is one line, exit 2)."""
    return cli.main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = cli.ArgumentParser("python -m qwenvl_jax.convert", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("import", help="HF Qwen-VL directory -> qwenvl_jax checkpoint")
    pi.add_argument("src", help="HF checkpoint directory (config.json + weight shards)")
    pi.add_argument("out", help="output directory (config.json + params/)")
    pe = sub.add_parser("export", help="qwenvl_jax checkpoint -> HF Qwen-VL directory")
    pe.add_argument(
        "src", help="a directory written by `import` / save_params, or a training workdir"
    )
    pe.add_argument("out", help="output HF directory")
    pe.add_argument(
        "--step", type=_step, default=None, help="the workdir's step (default: its latest)"
    )
    pe.add_argument("--dtype", choices=DTYPES, default="keep", help="cast the weights")
    pe.add_argument(
        "--max_shard_size", type=_size, default="2GiB", help="e.g. 2GiB, 500MB, or bytes"
    )
    pe.add_argument("--no_tokenizer", action="store_true", help="write no tokenizer files")
    pe.add_argument(
        "--peft",
        action="store_true",
        help="a LoRA workdir: write an HF PEFT adapter directory (adapter_config.json +"
        " adapter_model.safetensors) instead of merged full weights",
    )
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

    from qwenvl_jax.convert.errors import CheckpointError

    run = {"import": _import, "export": _export}.get(args.command, _import_tower)
    try:
        return run(args)
    except UserError as e:  # a bad path, flag, config.json, weight file or key; else a bug
        msg = _one_line(e)
        if isinstance(e, CheckpointError) and args.src not in msg:
            msg = f"{args.src}: {msg}"  # a library message that names only a key or a shard
        raise UserError(f"{args.command}: {msg}") from None


def _log(msg: str) -> None:
    print(msg, flush=True)


def _import(args) -> int:
    """`import`: an HF Qwen-VL directory -> our format."""
    from qwenvl_jax.convert import NotACheckpointError, checkpoint_kind, hf, save_params

    if os.path.isfile(args.src):
        raise UserError(
            f"{args.src} is a file; `import` takes the HF checkpoint directory (config.json +"
            " model*.safetensors or pytorch_model*.bin shards)"
        )
    try:
        kind = checkpoint_kind(args.src)
    except NotACheckpointError:  # no weights or no config.json: the HF reader says which
        kind = None
    if kind == "ours":
        raise UserError(f"{args.src} is already a qwenvl_jax checkpoint (params/); nothing to do")
    if kind == "workdir":
        raise UserError(
            f"{args.src} is a training workdir (checkpoints/<step>/), already in our format; use"
            " `export` to write HF weights from it"
        )
    _check_out(args.out)
    t0 = time.time()
    cfg = hf.read_config(args.src)
    _log(f"importing {args.src}")
    cfg, params = hf.import_hf(
        args.src, config=cfg, scan_layers=args.scan_layers, dtype=_dtype(args.dtype), progress=_log
    )
    _log(f"saving to {args.out}")
    save_params(args.out, params, cfg)
    _log(f"done in {time.time() - t0:.1f} s")
    return 0


def _export(args) -> int:
    """`export`: our format -> an HF directory."""
    from qwenvl_jax.convert import checkpoint_kind, export_hf, load_params

    kind = checkpoint_kind(args.src)  # none of the kinds: the error lists what the directory holds
    if kind == "hf":
        raise UserError(
            f"{args.src} is an HF checkpoint (weight shards), already in HF format; `export`"
            " takes a qwenvl_jax checkpoint (config.json + params/), which `import` makes"
        )
    if args.step is not None and kind != "workdir":
        raise UserError(
            f"--step {args.step}: {args.src} is a qwenvl_jax checkpoint (one set of params);"
            " --step picks a step of a training workdir (checkpoints/<step>/)"
        )
    if fileio.exists(args.out) and not fileio.isdir(args.out):
        raise UserError(f"output {args.out} is a file; give a directory")
    code = []
    if args.code_dir:
        code = sorted(glob.glob(os.path.join(args.code_dir, "*.py")))
        if not code:
            raise ConfigError(f"--code_dir {args.code_dir} holds no .py files")
    t0 = time.time()
    from qwenvl_jax.convert import peft

    lora = kind == "workdir" and peft.lora_settings(args.src) is not None
    if args.peft and not lora:
        raise UserError(f"--peft: {args.src} is not a LoRA training workdir (config.lora.rank 0)")
    if args.peft:
        _log(f"writing the PEFT adapter of {args.src} to {args.out}")
        written = peft.export_peft(args.src, args.out, args.step)
        _log(f"wrote {written}")
        return 0
    if lora:
        _log(f"loading {args.src} (LoRA workdir: adapters merged onto its config.init weights)")
        cfg, params, step = peft.load_merged(args.src, args.step)
        _log(f"read step {step}")
    elif kind == "workdir":
        from qwenvl_jax.convert.workdir import load_workdir_params

        _log(f"loading {args.src} (training workdir)")
        cfg, params, step = load_workdir_params(args.src, args.step)
        _log(f"read step {step}")
    else:
        _log(f"loading {args.src}")
        cfg, params = load_params(args.src)
    _log(f"exporting to {args.out}")
    written = export_hf(
        params,
        cfg,
        args.out,
        dtype=_dtype(args.dtype),
        max_shard_bytes=args.max_shard_size,
        tokenizer=None if args.no_tokenizer else "default",
        progress=_log,
    )
    for f in code:
        fileio.copy_file(f, fileio.join(args.out, os.path.basename(f)))
    written += code
    _log(f"wrote {len(written)} files")
    _log(f"done in {time.time() - t0:.1f} s")
    return 0


def _import_tower(args) -> int:
    """`import-llm` / `import-vit`: one stage-1 tower in our format, plus tower.json."""
    from qwenvl_jax.convert import openclip, qwen_llm, save_params

    if not os.path.exists(args.src):
        raise MissingPathError(f"{args.src} does not exist")
    if args.command == "import-llm" and not os.path.isdir(args.src):
        raise UserError(
            f"{args.src} is a file; import-llm takes the Qwen-7B directory (config.json +"
            " weight shards)"
        )
    if args.command == "import-vit" and args.heads <= 0:
        raise ConfigError(f"--heads {args.heads}: give a positive head count (16 for ViT-bigG-14)")
    _check_out(args.out)
    t0 = time.time()
    _log(f"importing {args.src}")
    if args.command == "import-llm":
        cfg, params = qwen_llm.import_qwen_llm(
            args.src, scan_layers=args.scan_layers, dtype=_dtype(args.dtype), progress=_log
        )
        info = {"tower": "llm", "source": os.path.abspath(args.src)}
    else:
        cfg, params, report = openclip.import_openclip(
            args.src,
            heads=args.heads,
            scan_layers=args.scan_layers,
            dtype=_dtype(args.dtype),
            progress=_log,
        )
        info = {"tower": "vit", "source": os.path.abspath(args.src), **report}
    _log(f"saving to {args.out}")
    save_params(args.out, params, cfg)
    qwen_llm.write_tower_json(args.out, info)
    _log(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
