"""Steps: plain functions over records, and the loop that runs a list of them over one shard.

A record is a dict (an image as encoded `bytes` under `"image"` until the writer stores it). A step
is `fn(record, ctx) -> iterable of records`: yield the record (changed or not) to keep it, yield
nothing or `raise Drop("reason")` to drop it, yield several to split it. `ctx` is the shard's
`Context`: a seeded `rng` (the same for the same seed and shard, whatever the runner) and
`count(name)` for counters that are not drops (e.g. `"modified"`).

Two more shapes for what cannot be done one record at a time: `batch_size=N` (the function takes a
list of up to N records and returns one result per record: an iterable of records or a `Drop`),
for batched models such as the CLIP scorer; `whole_shard=True` (the function takes the shard's list
and returns the records it keeps; every record missing from the output counts as a drop under
`drop_reason`), for grouping such as "the longest text per image".

Every step's counts (records in, out, dropped by reason, other counters) are returned by
`run_steps` and end up in the shard's done marker and in the run's `report.json`.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np


class Drop(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a step to drop the record; `reason` is the counter's name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class Context:
    """What a step may use besides its record: the shard's name, a seeded generator, counters."""

    shard: str
    seed: int
    rng: np.random.Generator = dataclasses.field(init=False)
    _step: str = ""
    counters: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(dict))
    examples: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # One stream per (seed, shard): a shard gives the same output under any runner, on any
        # worker, in any order, and on a rerun.
        self.rng = np.random.default_rng([self.seed, zlib.crc32(self.shard.encode())])

    def count(self, name: str, n: int = 1) -> None:
        """Adds `n` to the current step's counter `name` (not a drop; e.g. "modified")."""
        c = self.counters[self._step]
        c[name] = c.get(name, 0) + n

    def example(self, reason: str, message: str) -> None:
        """Keeps the first `message` (naming the sample) of the current step's drops for `reason`:
        `report.json` shows one per step and reason."""
        self.examples.setdefault(self._step, {}).setdefault(reason, message)


@dataclasses.dataclass(frozen=True)
class Step:
    """A named step (see the module docstring for the three shapes).

    Attributes:
      name: the step's name in counters and reports.
      fn: the function.
      batch_size: None (one record at a time) or the batch the function takes.
      whole_shard: the function takes the shard's records as one list.
      drop_reason: the reason for records a whole-shard step leaves out.
    """

    name: str
    fn: Callable
    batch_size: int | None = None
    whole_shard: bool = False
    drop_reason: str = "dropped"


def _record_step(step: Step, records: Iterable[dict], ctx: Context, c: dict) -> Iterator[dict]:
    drops = c["dropped"]
    for rec in records:
        c["in"] += 1
        ctx._step = step.name
        n = 0
        try:
            for out in step.fn(rec, ctx):
                n += 1
                yield out
        except Drop as d:
            if n == 0:
                drops[d.reason] = drops.get(d.reason, 0) + 1
            continue
        finally:
            c["out"] += n
        if n == 0:
            drops["dropped"] = drops.get("dropped", 0) + 1


def _batch_step(step: Step, records: Iterable[dict], ctx: Context, c: dict) -> Iterator[dict]:
    drops = c["dropped"]
    batch: list[dict] = []

    def flush():
        ctx._step = step.name
        results = list(step.fn(batch, ctx))
        if len(results) != len(batch):
            raise RuntimeError(f"step {step.name} returned {len(results)} results for {len(batch)}")
        for res in results:
            if isinstance(res, Drop):
                drops[res.reason] = drops.get(res.reason, 0) + 1
                continue
            outs = list(res)
            if not outs:
                drops["dropped"] = drops.get("dropped", 0) + 1
            c["out"] += len(outs)
            yield from outs

    for rec in records:
        c["in"] += 1
        batch.append(rec)
        if len(batch) == step.batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def run_steps(steps: Sequence[Step], records: Iterable[dict], ctx: Context) -> Iterator[dict]:
    """The records that pass every step, lazily; counts land in `ctx.counters[step.name]`:
    `in`, `out`, `dropped` {reason: n} and the step's own counters."""
    stream: Iterable[dict] = records
    for step in steps:
        c = ctx.counters[step.name]
        c.update({"in": 0, "out": 0, "dropped": {}})
        if step.whole_shard:
            stream = _shard_step(step, stream, ctx, c)
        elif step.batch_size:
            stream = _batch_step(step, stream, ctx, c)
        else:
            stream = _record_step(step, stream, ctx, c)
    return iter(stream)


def _shard_step(step: Step, records: Iterable[dict], ctx: Context, c: dict) -> Iterator[dict]:
    items = list(records)
    ctx._step = step.name
    out = list(step.fn(items, ctx))
    c["in"], c["out"] = len(items), len(out)
    if len(items) > len(out):
        c["dropped"][step.drop_reason] = len(items) - len(out)
    yield from out


def merge_counts(total: dict, counts: dict) -> dict:
    """Adds one shard's step counts into `total` (both {step: {"in", "out", "dropped", ...}})."""
    for step, c in counts.items():
        t = total.setdefault(step, {"in": 0, "out": 0, "dropped": {}})
        for k, v in c.items():
            if k == "dropped":
                for r, n in v.items():
                    t["dropped"][r] = t["dropped"].get(r, 0) + n
            else:
                t[k] = t.get(k, 0) + v
    return total


def plain(counts: Any) -> Any:
    """Counters as plain dicts (JSON, pickling across Beam workers)."""
    if isinstance(counts, dict):
        return {k: plain(v) for k, v in counts.items()}
    return counts
