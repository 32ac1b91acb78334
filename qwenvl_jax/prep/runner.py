"""Runs a list of steps over input shards: in this process, or as an Apache Beam pipeline.

Both runners do the same thing per shard (`process_shard`: read, run the steps, write the shard
and its done marker) with the same step functions, so a shard's output is byte-identical whichever
ran it. The Beam pipeline is `Create(pending shards) | Reshuffle | ParDo(process_shard)`: a shard is
the unit of work, as img2dataset's own Spark and Dataflow distribution does, which keeps each
worker's output a plain file the trainer reads and makes a rerun skip finished shards
(`shards.is_done`). `--runner=DirectRunner` runs Beam here; `DataflowRunner`, `FlinkRunner` or
`SparkRunner` with their pipeline options (after `--` on the command line) run it at scale.

When every shard is done, `finish` writes, from the done markers (so resumed runs count every
shard once):
- `OUT/<name>.jsonl`: the shards' lines in shard order (one file for a mixture source);
- `OUT/report.json`: per step, records in, out and dropped by reason, summed over shards;
- `OUT/mixture.json`: a `--config.data.mixture` file with one source over that file.

Progress (shards done, records in/out, records/s, ETA) is logged while it runs: in-process after
each shard; under Beam by a thread that watches the done markers (any runner, any machine).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError, optional_import
from qwenvl_jax.prep import shards
from qwenvl_jax.prep.steps import Context, Step, merge_counts, plain, run_steps

RUNNERS = ("inprocess", "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")
log = logging.getLogger("qwenvl_jax.prep")


def process_shard(
    path: str,
    out_dir: str,
    steps: Sequence[Step],
    seed: int,
    reader: Callable[[str], object] = shards.read_shard,
) -> dict:
    """Reads one input shard, runs `steps`, writes the output shard; returns its done marker."""
    name = shards.shard_name(path)
    t0 = time.perf_counter()
    ctx = Context(shard=name, seed=seed)
    n_in = 0

    def counted():
        nonlocal n_in
        for rec in reader(path):
            n_in += 1
            yield rec

    kept = run_steps(steps, counted(), ctx)
    marker = {"input": str(path), "records_in": None, "counts": None}
    # The records are consumed by write_shard; the counts are complete only afterwards.
    recs = list(kept)
    marker.update(records_in=n_in, counts=plain(dict(ctx.counters)), examples=ctx.examples)
    marker["seconds"] = round(time.perf_counter() - t0, 3)
    shards.write_shard(out_dir, name, recs, marker)
    return dict(marker, shard=name, records_out=len(recs))


def _check_names(paths: Sequence[str]) -> list[str]:
    names: dict[str, str] = {}
    for p in paths:
        n = shards.shard_name(p)
        if n in names:
            raise ConfigError(f"input shards {names[n]} and {p} both have the name {n!r}")
        names[n] = p
    return list(names)


class Progress:
    """Logs shards done, records, rate and ETA."""

    def __init__(self, total: int, already: int):
        self.total, self.done, self.t0 = total, already, time.perf_counter()
        self.started_with = already
        self.records_in = self.records_out = 0

    def add(self, marker: dict) -> None:
        self.done += 1
        self.records_in += marker.get("records_in") or 0
        self.records_out += marker.get("records_out") or 0
        dt = time.perf_counter() - self.t0
        new = self.done - self.started_with
        left = self.total - self.done
        eta = dt / new * left if new else float("nan")
        log.info(
            "prep: %d/%d shards (%s) | %d records in, %d kept | %.1f records/s | ETA %s",
            self.done,
            self.total,
            marker.get("shard"),
            self.records_in,
            self.records_out,
            self.records_in / dt if dt > 0 else 0.0,
            "-" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta)),
        )


def run(
    steps: Sequence[Step],
    inputs: Sequence[str],
    out_dir: str,
    *,
    seed: int = 0,
    runner: str = "inprocess",
    pipeline_args: Sequence[str] = (),
    reader: Callable[[str], object] = shards.read_shard,
    output_name: str = "train",
    mixture: dict | None = None,
) -> dict:
    """Runs `steps` over every input shard not already done, then `finish`. Returns the report.

    Args:
      steps: the steps, in order.
      inputs: input shard paths (local or gs://).
      out_dir: the output directory (local or gs://).
      seed: the seed of every shard's `Context.rng`.
      runner: "inprocess" or a Beam runner name (RUNNERS).
      pipeline_args: Beam pipeline options (`--project=...`, `--region=...`, ...).
      reader: path -> records (default: by extension, `shards.read_shard`).
      output_name: the merged file's name (`OUT/<output_name>.jsonl`).
      mixture: {source name: entry fields (task, box_format, image_root...)} for `mixture.json`
        (each entry's path is the merged file unless given), or None for no mixture file.
    """
    if runner not in RUNNERS:
        raise ConfigError(f"--runner={runner}: choose from {', '.join(RUNNERS)}")
    if not inputs:
        raise ConfigError("no input shards given (--input)")
    names = _check_names(inputs)
    for p in inputs:
        if not fileio.exists(p):
            raise ConfigError(f"input shard not found: {p}")
    pending = [p for p, n in zip(inputs, names, strict=True) if not shards.is_done(out_dir, n)]
    log.info(
        "prep: %d shards, %d already done, %d to run (%s)",
        len(inputs),
        len(inputs) - len(pending),
        len(pending),
        runner,
    )
    progress = Progress(len(inputs), len(inputs) - len(pending))
    if runner == "inprocess":
        for p in pending:
            progress.add(process_shard(p, out_dir, steps, seed, reader))
    elif pending:
        _run_beam(steps, pending, out_dir, seed, runner, pipeline_args, reader, progress)
    return finish(out_dir, names, output_name, mixture)


def _run_beam(steps, pending, out_dir, seed, runner, pipeline_args, reader, progress) -> None:
    beam = optional_import("apache_beam", "prep")
    from apache_beam.options.pipeline_options import PipelineOptions

    opts = PipelineOptions([f"--runner={runner}", *pipeline_args])
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(out_dir, pending, progress, stop), daemon=True)
    watcher.start()
    try:
        with beam.Pipeline(options=opts) as p:
            _ = (
                p
                | "Shards" >> beam.Create(list(pending))
                # One shard per worker: without it a runner may fuse Create with the work.
                | "Spread" >> beam.Reshuffle()
                | "Process" >> beam.ParDo(_ShardFn(out_dir, steps, seed, reader))
            )
    finally:
        stop.set()
        watcher.join()


class _ShardFn:
    """The Beam DoFn around `process_shard` (built lazily: Beam need not be importable here)."""

    def __new__(cls, out_dir, steps, seed, reader):
        import apache_beam as beam

        class ShardFn(beam.DoFn):
            def process(self, path):
                marker = process_shard(path, out_dir, steps, seed, reader)
                for step, c in marker["counts"].items():
                    for reason, n in c.get("dropped", {}).items():
                        beam.metrics.Metrics.counter("prep", f"{step}/{reason}").inc(n)
                beam.metrics.Metrics.counter("prep", "records_in").inc(marker["records_in"])
                beam.metrics.Metrics.counter("prep", "records_out").inc(marker["records_out"])
                yield marker["shard"]

        return ShardFn()


def _watch(out_dir: str, pending: Sequence[str], progress: Progress, stop, every: float = 2.0):
    left = {shards.shard_name(p) for p in pending}
    while left:
        for n in sorted(left):
            if shards.is_done(out_dir, n):
                left.discard(n)
                progress.add(shards.read_done(out_dir, n))
        if stop.wait(every) and not any(shards.is_done(out_dir, n) for n in left):
            return


def finish(out_dir: str, names: Sequence[str], output_name: str, mixture: dict | None) -> dict:
    """The merged JSON lines, `report.json` and `mixture.json` from the finished shards."""
    missing = [n for n in names if not shards.is_done(out_dir, n)]
    if missing:
        raise RuntimeError(f"shards not finished: {missing[:5]}")
    total: dict = {}
    examples: dict = {}
    records_in = records_out = 0
    merged = fileio.join(out_dir, output_name + ".jsonl")
    # An object store writes an object whole or not at all; a local file is renamed into place.
    tmp = merged if fileio.is_remote(merged) else merged + ".tmp"
    with fileio.path(tmp).open("wb") as w:
        for n in names:
            m = shards.read_done(out_dir, n)
            merge_counts(total, m["counts"])
            for step, ex in m.get("examples", {}).items():
                for reason, msg in ex.items():
                    examples.setdefault(step, {}).setdefault(reason, msg)
            records_in += m["records_in"]
            records_out += m["records_out"]
            with fileio.path(fileio.join(out_dir, n + ".jsonl")).open("rb") as r:
                while chunk := r.read(1 << 24):
                    w.write(chunk)
    if tmp != merged:
        fileio.path(tmp).replace(merged)
    report = {
        "shards": len(names),
        "records_in": records_in,
        "records_out": records_out,
        "steps": total,
        "removed": {s: sum(c["dropped"].values()) for s, c in total.items()},
        "examples": examples,
    }
    fileio.write_text(fileio.join(out_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    if mixture:
        srcs = {}
        for src_name, fields in mixture.items():
            srcs[src_name] = dict(kind="json", path=output_name + ".jsonl", weight=1.0)
            srcs[src_name].update(fields)
        doc = {
            "comment": "Written by python -m qwenvl_jax.prep; paths resolve against this file's"
            " directory. Copy the source entries into a stage's mixture (configs/data/README.md).",
            "mixing": "sample",
            "sources": srcs,
        }
        fileio.write_text(fileio.join(out_dir, "mixture.json"), json.dumps(doc, indent=1) + "\n")
    for step, removed in report["removed"].items():
        log.info("prep: %s removed %d", step, removed)
    return report
