"""Serve a Qwen-VL checkpoint behind an OpenAI-compatible HTTP API.

    python -m qwenvl_jax.serve --checkpoint=Qwen-VL-Chat [--port=8000] [--mesh=fsdp=4,model=2]

Endpoints: POST /v1/chat/completions (image_url parts: data: base64, http(s)://, and local paths
or file:// inside --allowed_local_dir), POST /v1/completions (raw prompts, `<img>URL</img>`
spans), GET /v1/models, /health, /metrics (Prometheus). SIGTERM stops taking requests and lets the
running ones finish for --shutdown_grace_s.
"""

from __future__ import annotations

import os
import sys

from qwenvl_jax import cli
from qwenvl_jax.errors import ConfigError, MissingPathError


def main(argv=None) -> int:
    return cli.main(lambda: _run(argv))


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"  # argparse names it in "invalid ... value"
    return parse


def _run(argv) -> None:
    p = cli.ArgumentParser("python -m qwenvl_jax.serve", __doc__)
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="HF dir, qwenvl_jax dir or training workdir (as from_pretrained takes)",
    )
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "fsdp=4,model=2"')
    # quantize.MODES, written out so that --help does not import JAX.
    p.add_argument("--quantize", default=None, choices=["int8", "fp8"], help="weight-only")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on an accelerator, float32 on a CPU",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, metavar="N")
    p.add_argument("--max_batch", type=_positive(int), default=8, metavar="N", help="decode slots")
    p.add_argument(
        "--max_seq_len",
        type=_positive(int),
        default=2048,
        metavar="N",
        help="prompt + new tokens per request",
    )
    p.add_argument(
        "--max_queue",
        type=_positive(int),
        default=256,
        metavar="N",
        help="waiting requests beyond this get HTTP 429",
    )
    p.add_argument("--prefill_chunk", type=_positive(int), default=512, metavar="N")
    p.add_argument(
        "--image_cache_mb", type=float, default=256.0, metavar="MB", help="image-feature cache size"
    )
    p.add_argument(
        "--prefix_cache_mb",
        type=float,
        default=256.0,
        metavar="MB",
        help="prompt-prefix KV cache size (0: off)",
    )
    p.add_argument(
        "--decode_steps",
        type=_positive(int),
        default=None,
        metavar="N",
        help="decode steps per compiled call, one host round trip each (default: the engine's, 4)",
    )
    p.add_argument(
        "--max_images", type=_positive(int), default=8, metavar="N", help="images per request"
    )
    p.add_argument(
        "--allowed_local_dir",
        default=None,
        metavar="DIR",
        help="local image paths and file:// URLs are read inside this directory only",
    )
    p.add_argument(
        "--served_model_name",
        default=None,
        metavar="NAME",
        help="the `model` clients send (default: the checkpoint's directory name)",
    )
    p.add_argument(
        "--shutdown_grace_s",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, running requests get this long to finish",
    )
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port={args.port} is not a TCP port (1..65535)")
    if not os.path.exists(args.checkpoint):
        raise MissingPathError(f"--checkpoint={args.checkpoint}: no such file or directory")
    if args.allowed_local_dir and not os.path.isdir(args.allowed_local_dir):
        raise MissingPathError(f"--allowed_local_dir={args.allowed_local_dir}: not a directory")
    if args.mesh:
        from qwenvl_jax.sharding import parse_mesh

        parse_mesh(args.mesh)  # a bad mesh string is one line before any weight is read
    # The GPU memory share training takes (0.9, qwenvl_jax/compiler.py) and, on a CPU, malloc
    # keeping freed memory for the next decode step; before JAX starts.
    from qwenvl_jax.compiler import keep_freed_memory, set_gpu_memory_fraction

    set_gpu_memory_fraction()
    keep_freed_memory()
    from qwenvl_jax.errors import optional_import

    for module in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
        optional_import(module, "serve")
    from qwenvl_jax.serve.server import serve

    serve(
        host=args.host,
        port=args.port,
        shutdown_grace_s=args.shutdown_grace_s,
        checkpoint=args.checkpoint,
        mesh=args.mesh,
        quantize=args.quantize,
        dtype=args.dtype,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        max_queue=args.max_queue,
        image_cache_mb=args.image_cache_mb,
        prefill_chunk=args.prefill_chunk,
        decode_steps=args.decode_steps,
        prefix_cache_mb=args.prefix_cache_mb,
        allowed_local_dir=args.allowed_local_dir,
        served_model_name=args.served_model_name,
        max_images=args.max_images,
    )


if __name__ == "__main__":
    sys.exit(main())
