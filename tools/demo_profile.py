"""Where a demo run's time went: one markdown table from a finished demo workdir.

    python tools/demo_profile.py WORKDIR [LOG]

Reads WORKDIR/results.json (wall seconds per phase) and each training stage's metrics.jsonl
(seconds per step and the time the step waited for its batch, logged every few steps), and, when
the run's captured output LOG is given, the trainer's "train step compiled in" lines (one per
stage, in stage order). Prints, per phase: wall time and its share of the run, steps, the median
seconds per step, the data wait per step, and the compile time (for the stages: the first logged
interval's excess over the median, when no LOG is given).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys


def _metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def profile(workdir: str, log: str | None = None) -> list[dict]:
    """One row per phase of the run in `workdir` (see the module docstring)."""
    with open(os.path.join(workdir, "results.json")) as f:
        result = json.load(f)
    seconds = result["seconds"]
    total = seconds["total"]
    compiles: list[float] = []
    if log:
        with open(log, errors="replace") as f:
            compiles = [float(x) for x in re.findall(r"train step compiled in ([\d.]+)s", f.read())]
    rows, k = [], 0
    for phase, wall in seconds.items():
        if phase == "total":
            continue
        row = {"phase": phase, "wall_s": wall, "share": wall / total}
        mpath = os.path.join(workdir, phase, "metrics.jsonl")
        if os.path.isfile(mpath):
            recs = _metrics(mpath)
            steps = [r["step_s"] for r in recs]
            med = statistics.median(steps)
            row.update(
                steps=int(recs[-1]["step"]),
                step_s=med,
                data_wait_s=statistics.median(r["data_wait_s"] for r in recs),
                real_token_fraction=statistics.mean(r["real_token_fraction"] for r in recs),
            )
            if k < len(compiles):
                row["compile_s"] = compiles[k]
            else:  # the first interval holds the compilation
                first = recs[0]
                row["compile_s"] = max(first["step_s"] - med, 0.0) * first["step"]
            k += 1
        elif phase == "stage0":
            with open(os.path.join(workdir, "stage0", "stage0_metrics.json")) as f:
                s0 = json.load(f)
            row.update(steps=s0["steps"], step_s=s0["seconds"] / s0["steps"])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    out = [
        "| phase | wall | share | steps | s/step (median) | data wait s/step | compile s"
        " | real tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['phase']} | {r['wall_s'] / 60:.1f} min | {100 * r['share']:.0f}% |"
            f" {r.get('steps', '-')} | {f(r.get('step_s'), '.3f')} |"
            f" {f(r.get('data_wait_s'), '.3f')} | {f(r.get('compile_s'), '.1f')} |"
            f" {f(r.get('real_token_fraction'), '.2f')} |"
        )
    total = sum(r["wall_s"] for r in rows)
    out.append(f"| total | {total / 60:.1f} min | | | | | | |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(markdown(profile(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)))
