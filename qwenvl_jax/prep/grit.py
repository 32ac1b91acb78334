"""A.3 GRIT: grounded captions with the recursive boxes removed by the greedy rule.

  python -m qwenvl_jax.prep grit --input='grit/*.tar' --output=out/grit
      [--spans=ref_exps,noun_chunks]

Input: GRIT-20M downloaded by img2dataset (the parquet's `caption`, `width`, `height`, `ref_exps`,
`noun_chunks` kept as metadata), `.tar` or `.parquet`. A GRIT span is `[start, end, x1, y1, x2, y2,
score]`: characters of the caption and a box normalised to [0, 1]. One caption holds nested spans
("a man in a red hat" and "a red hat"), which cannot both become `<ref>` text. The paper cleans them
"with the greedy algorithm ... the most box labels with no recursive box labels": the spans (boxes
of one span grouped) are taken by earliest end, each kept when it starts at or after the end of the
last one kept; earliest-end-first keeps the largest possible number of spans with no two
overlapping. Normalised boxes are only right on an image of the original's shape: an image whose
aspect ratio differs from the original's (img2dataset resized it with crop or border) is dropped
(`aspect_changed`). Output lines are the trainer's `grounding` task with `box_format` xyxy_1000
(`{"image", "caption", "refs": [{"span", "boxes"}], "text"}`, `text` the training text).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

from qwenvl_jax import grounding
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.prep import boxes, pairs, runner, shards
from qwenvl_jax.prep.steps import Context, Drop, Step

HELP = "A.3: GRIT grounded captions, nested boxes removed greedily"
ASPECT_TOLERANCE = 0.01  # relative: img2dataset's keep-ratio resize rounds sides to whole pixels


def greedy_spans(spans: Sequence[Sequence[float]]) -> list[tuple[int, int, list]]:
    """The most non-overlapping spans: `[(start, end, [box, ...]), ...]` in caption order.

    Args:
      spans: GRIT rows `[start, end, x1, y1, x2, y2, (score)]`; rows with the same (start, end)
        are one span with several boxes.
    """
    grouped: dict[tuple[int, int], list] = {}
    for row in spans:
        s, e = int(row[0]), int(row[1])
        box = [float(v) for v in row[2:6]]
        if box not in grouped.setdefault((s, e), []):
            grouped[(s, e)].append(box)
    kept, last_end = [], -1
    # Earliest end first (ties: more boxes, then the later start, i.e. the shorter span).
    for (s, e), bxs in sorted(grouped.items(), key=lambda kv: (kv[0][1], -len(kv[1]), -kv[0][0])):
        if s >= last_end and s < e:
            kept.append((s, e, bxs))
            last_end = e
    return sorted(kept)


def clean_grit(rec: dict, ctx: Context, *, span_fields: tuple[str, ...]) -> Iterator[dict]:
    """A.3: greedy span cleaning, boxes onto the grid, the record in the trainer's layout."""
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise Drop("no_text")
    w, h = shards.image_size(rec)
    ow = rec.get("original_width") or rec.get("width")
    oh = rec.get("original_height") or rec.get("height")
    if ow and oh and abs((w / h) / (float(ow) / float(oh)) - 1) > ASPECT_TOLERANCE:
        raise Drop("aspect_changed")
    rows = [r for f in span_fields for r in (rec.get(f) or [])]
    spans = greedy_spans(rows)
    ctx.count("spans_in", len({(int(r[0]), int(r[1])) for r in rows}))
    ctx.count("spans_kept", len(spans))
    refs, parts, pos = [], [], 0
    sample = f"{ctx.shard}/{rec.get('key')}"
    for s, e, bxs in spans:
        if not 0 <= s < e <= len(caption):
            raise Drop("span_outside_caption")
        try:
            grid = [boxes.grid_box([b[0] * w, b[1] * h, b[2] * w, b[3] * h], w, h, sample=sample)
                    for b in bxs]  # fmt: skip
        except boxes.BoxError as err:
            raise Drop(err.reason) from None
        refs.append({"span": [s, e], "boxes": [list(g) for g in grid]})
        parts += [caption[pos:s], grounding.ref_text(caption[s:e], grid)]
        pos = e
    if not refs:
        raise Drop("no_boxes")
    parts.append(caption[pos:])
    yield {
        "image": rec["image"],
        "image_ext": rec.get("image_ext", "jpg"),
        "key": rec.get("key"),
        "caption": caption,
        "refs": refs,
        "width": w,
        "height": h,
        "text": "".join(parts).strip(),
    }


def add_arguments(p) -> None:
    p.add_argument("--spans", default="ref_exps,noun_chunks", help="GRIT span fields to use")
    p.add_argument("--name", default="grit", help="the merged output's name (NAME.jsonl)")


def run(args, pipeline_args) -> dict:
    fields = tuple(f.strip() for f in args.spans.split(",") if f.strip())
    bad = [f for f in fields if f not in ("ref_exps", "noun_chunks")]
    if bad or not fields:
        raise ConfigError(f"--spans={args.spans}: choose from ref_exps, noun_chunks")
    steps = [
        Step("image", pairs.check_image),
        Step("grit", functools.partial(clean_grit, span_fields=fields)),
    ]
    return runner.run(
        steps,
        args.input,
        args.output,
        seed=args.seed,
        runner=args.runner,
        pipeline_args=pipeline_args,
        output_name=args.name,
        mixture={args.name: {"task": "grounding", "box_format": "xyxy_1000"}},
    )
