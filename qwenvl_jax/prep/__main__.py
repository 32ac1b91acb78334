"""Command line: prepare the paper's pre-training data (Appendix A) as files the trainer reads.

  python -m qwenvl_jax.prep COMMAND --input=SHARDS --output=DIR [--runner=inprocess] [--seed=0]
      [COMMAND's flags] [-- BEAM PIPELINE OPTIONS]

COMMAND is one of the registered steps (`python -m qwenvl_jax.prep --help` lists them; each has its
own `--help`). --input takes paths or globs, comma-separated or repeated (local or gs://).
--runner=inprocess runs the shards one after the other in this process; a Beam runner
(DirectRunner here, DataflowRunner / FlinkRunner / SparkRunner at scale, `pip install
'qwenvl_jax[prep]'`) runs the same steps as a pipeline, with its options after `--`, e.g.
`-- --project=P --region=us-central1 --temp_location=gs://B/tmp --requirements_file=req.txt`.
A rerun skips the shards already finished in --output. A mistake is one line `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import logging
import os
import sys

from qwenvl_jax import cli, fileio
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.prep import runner

# name -> module with HELP, add_arguments(parser) and run(args, pipeline_args) (see __init__.py).
COMMANDS = {
    "pairs": "qwenvl_jax.prep.pairs",
    "vqav2": "qwenvl_jax.prep.vqa",
    "grit": "qwenvl_jax.prep.grit",
    "refexp": "qwenvl_jax.prep.refexp",
    "synthdog": "qwenvl_jax.prep.ocr_synth",
    "pdf": "qwenvl_jax.prep.pdf",
    "html": "qwenvl_jax.prep.html",
}


def expand_inputs(values: list[str]) -> list[str]:
    """--input values (comma lists, globs; local or gs://) as a sorted list of files."""
    out: list[str] = []
    for v in values:
        for item in (x.strip() for x in v.split(",")):
            if not item:
                continue
            if any(c in item for c in "*?["):
                if fileio.is_remote(item):
                    head, _, pattern = item.rpartition("/")
                    found = sorted(os.fspath(p) for p in fileio.path(head).glob(pattern))
                else:
                    found = sorted(glob.glob(item))
                if not found:
                    raise ConfigError(f"--input={item} matches no file")
                out += found
            else:
                out.append(item)
    return out


def common_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every command shares."""
    p.add_argument("--input", action="append", required=True, help="input shards (globs, a,b)")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--runner", default="inprocess", choices=runner.RUNNERS)
    p.add_argument("--seed", type=int, default=0, help="seed of every shard's random stream")


def available() -> dict[str, object]:
    """The registered commands whose module is present."""
    mods = {}
    for name, mod in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return mods


def parser(mods: dict) -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m qwenvl_jax.prep", __doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in mods.items():
        sp = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.__doc__,
            formatter_class=cli.HelpFormatter,
            allow_abbrev=False,
        )
        sp.error = p.error  # one line, exit 2, like the top level
        common_arguments(sp)
        mod.add_arguments(sp)
    return p


def _main(argv: list[str]) -> None:
    pipeline_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pipeline_args = argv[:i], argv[i + 1 :]
    mods = available()
    args = parser(mods).parse_args(argv)
    if pipeline_args and args.runner == "inprocess":
        raise ConfigError("Beam pipeline options after -- need a Beam --runner")
    args.input = expand_inputs(args.input)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    mods[args.command].run(args, pipeline_args)


def main(argv: list[str] | None = None) -> int:
    return cli.main(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
