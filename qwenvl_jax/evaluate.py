"""Evaluate a checkpoint on a published benchmark (flags only; the work is `eval.run.evaluate`).

    python -m qwenvl_jax.evaluate --checkpoint=Qwen-VL --benchmark=textvqa_val \
        --data_dir=. --out=eval_out --batch_size=16 [--chat] [--mesh=fsdp=4,model=2]

`--data_dir` holds `data/<dataset>/...` as the eval_mm scripts read it (sources:
`qwenvl_jax.eval.benchmarks.DATA_SOURCES`). Rerunning the same command resumes a killed run.
"""

from __future__ import annotations

import argparse
import sys

from qwenvl_jax.errors import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenvl_jax.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="HF dir, qwenvl_jax dir or workdir")
    p.add_argument("--benchmark", required=True, help="an eval_mm dataset name")
    p.add_argument("--data_dir", default=".", help="directory holding data/<dataset>/")
    p.add_argument("--out", default="eval_out", help="predictions and scores directory")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--chat", action="store_true", help="ChatML prompts (Qwen-VL-Chat)")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "fsdp=4,model=2"')
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default by platform)")
    p.add_argument("--quantize", default=None, choices=["int8"], help="weight-only int8")
    args = p.parse_args(argv)

    def body():
        from qwenvl_jax.eval.run import evaluate

        evaluate(
            args.checkpoint,
            args.benchmark,
            args.data_dir,
            args.out,
            batch_size=args.batch_size,
            limit=args.limit,
            chat=args.chat,
            mesh=args.mesh,
            dtype=args.dtype,
            quantize=args.quantize,
            log=lambda s: print(s, flush=True),
        )

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
