"""Evaluate a checkpoint on a published benchmark (flags only; the work is `eval.run.evaluate`).

    python -m qwenvl_jax.evaluate --checkpoint=Qwen-VL --benchmark=textvqa_val --data_dir=. \\
        --out=eval_out --batch_size=16 [--chat] [--mesh=fsdp=4,model=2]

`--data_dir` holds `data/<dataset>/...` as the eval_mm scripts read it (sources:
`qwenvl_jax.eval.benchmarks.DATA_SOURCES`). Rerunning the same command resumes a killed run: the
questions in OUT/BENCHMARK.jsonl are skipped, a line there that cannot be read (cut by a kill,
damaged on disk) is dropped with one line saying which, and its question asked again.
"""

from __future__ import annotations

import sys
import textwrap

from qwenvl_jax import cli
from qwenvl_jax.eval import benchmarks


def benchmark_list() -> str:
    """The --help text's list of `benchmarks.BENCHMARKS`, by kind."""
    kinds: dict[str, list[str]] = {}
    for b in benchmarks.BENCHMARKS.values():
        kinds.setdefault(b.kind, []).append(b.name if b.metric else f"{b.name}*")
    lines = ["benchmarks (--benchmark; the eval_mm scripts' --dataset names), by kind:"]
    for kind, names in kinds.items():
        lines += textwrap.wrap(
            ", ".join(names), 96, initial_indent=f"  {kind}: ", subsequent_indent="    "
        )
    lines.append("  * no public answers: predictions only, scored by the dataset's server")
    return "\n".join(lines)


def main(argv=None) -> int:
    return cli.main(lambda: _run(argv))


def _run(argv) -> None:
    p = cli.ArgumentParser(
        "python -m qwenvl_jax.evaluate",
        __doc__,
        usage="%(prog)s --checkpoint=DIR --benchmark=NAME [--data_dir=DIR] [--out=DIR] [...]",
        epilog=benchmark_list(),
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="HF dir, qwenvl_jax dir or workdir"
    )
    p.add_argument(
        "--benchmark",
        required=True,
        choices=list(benchmarks.BENCHMARKS),
        metavar="NAME",
        help="an eval_mm dataset name (listed below)",
    )
    p.add_argument(
        "--data_dir", default=".", metavar="DIR", help="directory holding data/<dataset>/"
    )
    p.add_argument(
        "--out", default="eval_out", metavar="DIR", help="predictions and scores directory"
    )
    p.add_argument("--batch_size", type=int, default=8, metavar="N", help="questions per batch")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N questions only")
    p.add_argument("--chat", action="store_true", help="ChatML prompts (Qwen-VL-Chat)")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "fsdp=4,model=2"')
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default by platform)")
    # quantize.MODES, written out so that --help does not import JAX.
    p.add_argument("--quantize", default=None, choices=["int8", "fp8"], help="weight-only")
    p.add_argument("--pause_after", type=int, default=None, metavar="N",
                   help="after N predictions, wait while OUT/BENCHMARK.paused exists")  # fmt: skip
    args = p.parse_args(argv)
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
        pause_after=args.pause_after,
        log=lambda s: print(s, flush=True),
    )


if __name__ == "__main__":
    sys.exit(main())
