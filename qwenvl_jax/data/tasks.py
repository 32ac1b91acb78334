"""Task formats: one raw record -> token ids + per-token label mask (Qwen-VL paper, Appendix B).

Every task turns a record into an `Example`: `ids` int32 [n] and `labels` bool [n], where
`labels[i]` says that token i is a supervised *label* (the published `finetune.py` convention: its
`labels` array equals `input_ids` where supervised and -100 elsewhere). The packer turns this
into the trainer's next-token `targets` / `loss_mask`: token i is predicted at position i - 1 of
the same sample.

Pre-training formats (Appendix B.1; black = prefix without loss, blue = label with loss). The prefix
and the label text are tokenized separately (as `finetune.py` tokenizes each turn separately), and
`<|endoftext|>` (the paper's `<eos>`) closes every sample and is supervised:

- `caption`: `<img>p</img>Generate the caption in English:` | ` {caption}<eos>`
- `vqa`: `<img>p</img>{question} Answer:` | ` {answer}<eos>`
- `grounding` (GRIT): `<img>p</img>Generate the caption in English with grounding:` |
  ` {caption with <ref>phrase</ref><box>(x1,y1),(x2,y2)</box> inline}<eos>`
- `ref_grounding`: `<img>p</img><ref>{expression}</ref>` | `<box>(x1,y1),(x2,y2)</box><eos>`
- `grounded_caption`: `<img>p</img><ref>This</ref><box>(x1,y1),(x2,y2)</box>` |
  ` is {expression}<eos>`
- `ocr`: `<img>p</img>OCR with grounding:` |
  ` <ref>{line}</ref><quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>` per line, no separator, `<eos>`
- `text`: (none) | `{text}<eos>`

The prompts are the paper's (`Generate the caption in English:` is its pre-training prompt; the
captioning eval uses `Describe the image in English:`). VQA follows the published VQA eval prompt
`<img>{}</img>{} Answer:` with the answer after one space (its few-shot format).

`chatml` is supervised fine-tuning exactly as the published `finetune.py` `preprocess` (spec
8.2): system turn, then per turn `<|im_start|>role\\n{value}<|im_end|>\\n`; labels on every
`<|im_start|>`, `<|im_end|>`, the `\\n` after each `<|im_end|>`, and the assistant content.

Boxes are integers in [0, 1000): `floor(v / size * 1000)` clipped to 999, (x1, y1) top-left.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qwenvl_jax.chat import SYSTEM
from qwenvl_jax.grounding import box_text, quad_text

ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
BOX_FORMATS = ("xyxy_pixel", "xywh_pixel", "xyxy_norm", "yxyx_norm", "xyxy_1000")
TASKS = (
    "caption",
    "vqa",
    "grounding",
    "ref_grounding",
    "grounded_caption",
    "ocr",
    "text",
    "chatml",
)


class BadSample(ValueError):
    """A record that cannot become a training sample; `reason` is the metrics counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclasses.dataclass
class Example:
    """One tokenized sample.

    Attributes:
      ids: int32 [n] token ids (image spans expanded to the tokenizer's image_span + 2 ids).
      labels: bool [n]; True where token i is supervised (predicted from position i - 1).
      images: one image source per `<img>` span, in order: a path/URL str or encoded image bytes.
      source: the name of the data source.
      index: the record's index within its source.
      events: counter names to add to the metrics (e.g. "box_clipped"); the sample is still used.
    """

    ids: np.ndarray
    labels: np.ndarray
    images: list
    source: str = ""
    index: int = -1
    events: tuple = ()

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class Skip:
    """Stands in for a record that was skipped; it travels down the pipeline to be counted."""

    source: str
    index: int
    reason: str
    message: str


# ----------------------------------------------------------------------------------- boxes
def normalize_box(
    box: Sequence[float],
    fmt: str,
    width: float | None = None,
    height: float | None = None,
    events: list | None = None,
) -> tuple[int, int, int, int]:
    """A box as Qwen-VL's integer (x1, y1, x2, y2) in [0, 1000).

    Args:
      box: 4 numbers in `fmt`.
      fmt: `xyxy_pixel`, `xywh_pixel` (need width/height), `xyxy_norm`, `yxyx_norm` (TFDS BBox,
        floats in [0, 1]), or `xyxy_1000` (already Qwen-VL integers).
      width, height: the image size in pixels, for pixel formats.
      events: a list that receives "box_clipped" when the box reached outside the image.

    Raises:
      BadSample("bad_box"): not 4 finite numbers, or empty (x2 <= x1 or y2 <= y1).
      BadSample("box_outside_image"): nothing of the box lies inside the image.
    """
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise BadSample("bad_box", f"box {box!r} is not 4 numbers") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise BadSample("bad_box", f"box {box!r} is not 4 finite numbers")
    if fmt in ("xyxy_pixel", "xywh_pixel"):
        if not width or not height:
            raise BadSample("bad_box", f"pixel box {box!r} needs the image width and height")
        x1, y1, a, b = vals
        x2, y2 = (x1 + a, y1 + b) if fmt == "xywh_pixel" else (a, b)
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    elif fmt == "xyxy_norm":
        x1, y1, x2, y2 = vals
    elif fmt == "yxyx_norm":
        y1, x1, y2, x2 = vals
    elif fmt == "xyxy_1000":
        x1, y1, x2, y2 = (v / 1000.0 for v in vals)
    else:
        raise ValueError(f"unknown box format {fmt!r}; choose from {BOX_FORMATS}")
    if x2 <= x1 or y2 <= y1:
        raise BadSample("bad_box", f"box {box!r} ({fmt}) is empty or inverted")
    if x2 <= 0 or y2 <= 0 or x1 >= 1 or y1 >= 1:
        raise BadSample("box_outside_image", f"box {box!r} ({fmt}) lies outside the image")
    eps = 1e-6
    if x1 < -eps or y1 < -eps or x2 > 1 + eps or y2 > 1 + eps:
        if events is not None:
            events.append("box_clipped")

    def q(v: float) -> int:
        return min(999, max(0, int(math.floor(v * 1000 + 1e-9))))

    return q(x1), q(y1), q(x2), q(y2)


def normalize_quad(quad: Sequence[float], fmt: str, width=None, height=None, events=None):
    """8 numbers (4 corner points x, y) in pixels (`fmt` *_pixel), [0, 1] (*_norm) or [0, 1000)."""
    try:
        vals = [float(v) for v in quad]
    except (TypeError, ValueError):
        raise BadSample("bad_box", f"quad {quad!r} is not 8 numbers") from None
    if len(vals) != 8 or not all(math.isfinite(v) for v in vals):
        raise BadSample("bad_box", f"quad {quad!r} is not 8 finite numbers")
    if fmt.endswith("_pixel"):
        if not width or not height:
            raise BadSample("bad_box", f"pixel quad {quad!r} needs the image width and height")
        scale = [1 / width, 1 / height] * 4
    elif fmt == "xyxy_1000":
        scale = [1e-3] * 8
    else:
        scale = [1.0] * 8
    vals = [v * s for v, s in zip(vals, scale, strict=True)]
    xs, ys = vals[0::2], vals[1::2]
    if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= 1 or min(ys) >= 1:
        raise BadSample("box_outside_image", f"quad {quad!r} ({fmt}) lies outside the image")
    if min(vals) < -1e-6 or max(vals) > 1 + 1e-6:
        if events is not None:
            events.append("box_clipped")
    return tuple(min(999, max(0, int(math.floor(v * 1000 + 1e-9)))) for v in vals)


# ----------------------------------------------------------------------------------- helpers
def _text(record: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise BadSample("missing_field", f"record has no field {key!r} (has {sorted(record)})")
    v = record[key]
    if isinstance(v, bytes):
        v = v.decode("utf-8", errors="replace")
    if not isinstance(v, str):
        raise BadSample("bad_field", f"field {key!r} is {type(v).__name__}, expected text")
    if not allow_empty and not v.strip():
        raise BadSample("bad_field", f"field {key!r} is empty")
    return v


def _boxes(record: dict, key: str) -> list:
    v = record.get(key)
    if v is None:
        raise BadSample("missing_field", f"record has no field {key!r} (has {sorted(record)})")
    v = np.asarray(v, dtype=object).tolist() if isinstance(v, np.ndarray) else v
    if len(v) and not isinstance(v[0], (list, tuple, np.ndarray)):
        v = [v]  # a single box
    if not v:
        raise BadSample("bad_box", f"field {key!r} holds no box")
    return list(v)


def _encode(tok, text: str) -> list[int]:
    try:
        ids = tok.encode(text, allowed_special="all")
    except ValueError as e:
        # tokenizer.ImageSpanError names its reason; other encode errors are bad image tags too.
        raise BadSample(getattr(e, "reason", "bad_image_tag"), str(e)) from None
    # encode closes every <img> with its </img>; one more </img> has no opening tag and would
    # break the image spans the packer finds: the span rule (tokenizer.image_span_starts) says so.
    try:
        tok.image_spans(ids)
    except ValueError as e:
        raise BadSample(getattr(e, "reason", "bad_image_tag"), f"{e} in {text[:80]!r}") from None
    return ids


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Per-source options of a task format.

    Attributes:
      box_format: how boxes are given in the records (see `normalize_box`).
      caption_prompt / grounding_prompt / ocr_prompt / vqa_suffix: the prompt texts.
      grounded_caption_ref: the `<ref>` text of the grounded-captioning duality task.
      system_message: ChatML system message (finetune.py's default).
    """

    box_format: str = "xyxy_pixel"
    caption_prompt: str = "Generate the caption in English:"
    grounding_prompt: str = "Generate the caption in English with grounding:"
    ocr_prompt: str = "OCR with grounding:"
    vqa_suffix: str = " Answer:"
    grounded_caption_ref: str = "This"
    grounded_caption_join: str = " is "
    system_message: str = SYSTEM


def _size(record: dict, image_size_fn: Callable | None, image_src) -> tuple[Any, Any]:
    w, h = record.get("width"), record.get("height")
    if (not w or not h) and image_size_fn is not None:
        w, h = image_size_fn(image_src)
    return w, h


def _pixel_size_needed(opts: TaskOptions) -> bool:
    return opts.box_format.endswith("_pixel")


def pretraining_texts(
    task: str, record: dict, opts: TaskOptions, image_size_fn=None, image_src=None
) -> tuple[str, str, list]:
    """The (prefix text after the image, label text, events) of a pre-training task record.

    `record` holds the task's canonical fields (see `sources.py`); the `<img>` tag is added by
    `make_example`. `image_size_fn(src) -> (width, height)` is called only for pixel boxes whose
    record has no width/height.
    """
    events: list = []
    if task == "caption":
        return opts.caption_prompt, " " + _text(record, "caption").strip(), events
    if task == "vqa":
        q = _text(record, "question").strip()
        return q + opts.vqa_suffix, " " + _text(record, "answer").strip(), events
    if task == "text":
        return "", _text(record, "text"), events
    w = h = None
    if _pixel_size_needed(opts):
        w, h = _size(record, image_size_fn, image_src)
    if task == "ref_grounding":
        expr = _text(record, "expression").strip()
        boxes = [normalize_box(b, opts.box_format, w, h, events) for b in _boxes(record, "boxes")]
        return f"<ref>{expr}</ref>", "".join(box_text(b) for b in boxes), events
    if task == "grounded_caption":
        expr = _text(record, "expression").strip()
        boxes = [normalize_box(b, opts.box_format, w, h, events) for b in _boxes(record, "boxes")]
        prefix = f"<ref>{opts.grounded_caption_ref}</ref>" + "".join(box_text(b) for b in boxes)
        return prefix, opts.grounded_caption_join + expr, events
    if task == "grounding":
        caption = _text(record, "caption")
        refs = record.get("refs")
        if not isinstance(refs, (list, tuple)) or not refs:
            raise BadSample("missing_field", "grounding record needs a non-empty 'refs' list")
        spans = []
        for r in refs:
            if not isinstance(r, dict) or "boxes" not in r:
                msg = f"grounding ref {r!r} needs 'boxes' and 'span' or 'phrase'"
                raise BadSample("bad_field", msg)
            if "span" in r:
                s, e = (int(v) for v in r["span"])
            elif "phrase" in r:
                s = caption.find(r["phrase"])
                e = s + len(r["phrase"])
                if s < 0:
                    raise BadSample("bad_field", f"phrase {r['phrase']!r} not in the caption")
            else:
                raise BadSample("bad_field", f"grounding ref {r!r} has neither 'span' nor 'phrase'")
            if not 0 <= s < e <= len(caption):
                raise BadSample("bad_field", f"span ({s}, {e}) outside caption of {len(caption)}")
            boxes = [normalize_box(b, opts.box_format, w, h, events) for b in _boxes(r, "boxes")]
            spans.append((s, e, boxes))
        spans.sort()
        out, pos = [], 0
        for s, e, boxes in spans:
            if s < pos:
                raise BadSample("bad_field", f"grounding spans overlap at character {s}")
            out += [caption[pos:s], f"<ref>{caption[s:e]}</ref>", *(box_text(b) for b in boxes)]
            pos = e
        out.append(caption[pos:])
        return opts.grounding_prompt, " " + "".join(out).strip(), events
    if task == "ocr":
        lines = record.get("lines")
        if not isinstance(lines, (list, tuple)) or not lines:
            raise BadSample("missing_field", "ocr record needs a non-empty 'lines' list")
        parts = []
        for ln in lines:
            if not isinstance(ln, dict) or "text" not in ln:
                raise BadSample("bad_field", f"ocr line {ln!r} needs 'text' and 'quad' or 'box'")
            text = _text(ln, "text").strip()
            if "quad" in ln:
                loc = quad_text(normalize_quad(ln["quad"], opts.box_format, w, h, events))
            elif "box" in ln:
                loc = box_text(normalize_box(ln["box"], opts.box_format, w, h, events))
            else:
                raise BadSample("bad_field", f"ocr line {ln!r} needs 'quad' or 'box'")
            parts.append(f"<ref>{text}</ref>{loc}")
        return opts.ocr_prompt, " " + "".join(parts), events
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def chatml_ids(tok, conversations: Any, system_message: str = SYSTEM):
    """ids and labels of one conversation, as the published `finetune.py` `preprocess` (spec 8.2).

    Args:
      tok: the tokenizer.
      conversations: list of {"from": "user"|"assistant" (or "human"|"gpt"), "value": str}.
      system_message: the system turn's text.

    Returns:
      (ids list[int], labels list[bool]).

    Raises:
      BadSample: a malformed conversation (not a list, a turn without from/value, an unknown role,
        no assistant turn, a last turn that is not the assistant's), an unclosed `<img>`, a
        `</img>` without `<img>` or an image path over 255 bytes.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadSample("malformed_conversation", "'conversations' must be a non-empty list")
    turns = []
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            msg = f"turn {j} is not {{'from', 'value'}}: {turn!r}"
            raise BadSample("malformed_conversation", msg)
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None or not isinstance(turn["value"], str):
            msg = f"turn {j}: unsupported role {turn['from']!r} or non-text value"
            raise BadSample("malformed_conversation", msg)
        turns.append((role, turn["value"]))
    # finetune.py drops the first message when it is not the user's.
    if turns[0][0] != "user":
        turns = turns[1:]
    if not any(r == "assistant" for r, _ in turns):
        raise BadSample("malformed_conversation", "conversation has no assistant turn")
    if turns[-1][0] != "assistant":
        # A trailing user turn has no answer to learn; finetune.py would train on its markers.
        raise BadSample("malformed_conversation", "conversation ends on a user turn")
    nl = _encode(tok, "\n")
    im_start, im_end = tok.im_start_id, tok.im_end_id
    sys_ids = [im_start] + _encode(tok, "system") + nl + _encode(tok, system_message)
    sys_ids += [im_end] + nl
    ids = list(sys_ids)
    labels = [True] + [False] * (len(sys_ids) - 3) + [True, True]
    role_ids = {r: [im_start] + _encode(tok, r) for r in ("user", "assistant")}
    for role, value in turns:
        content = _encode(tok, value)
        head = role_ids[role] + nl
        ids += head + content + [im_end] + nl
        supervised = role == "assistant"
        labels += [True] + [False] * (len(head) - 1) + [supervised] * len(content) + [True, True]
    return ids, labels


def make_example(
    tok,
    task: str,
    record: dict,
    *,
    opts: TaskOptions = TaskOptions(),
    source: str = "",
    index: int = -1,
    image_tag: str | None = None,
    image_src: Any = None,
    image_base: Callable[[str], Any] | None = None,
    image_size_fn: Callable | None = None,
) -> Example:
    """Build the `Example` of one record.

    Args:
      tok: the tokenizer (`encode(text, allowed_special="all")`, special ids as attributes).
      task: one of `TASKS`.
      record: the task's canonical fields.
      opts: task options.
      source, index: where the record came from (for logs and counters).
      image_tag: the text written between `<img>` and `</img>` for single-image tasks (the path as
        given in the data, at most 255 UTF-8 bytes); required for every task except text/chatml.
      image_src: what is loaded for that image (a resolved path/URL or encoded bytes); default
        `image_tag`.
      image_base: for chatml, maps a path written in the conversation to what is loaded (resolves
        relative paths against the data file's directory).
      image_size_fn: `(src) -> (width, height)`, used for pixel boxes without width/height fields.

    Raises:
      BadSample: the record cannot become a sample (the reason is the counter name).
    """
    if task == "chatml":
        ids, labels = chatml_ids(tok, record.get("conversations"), opts.system_message)
        paths = tok.image_paths(ids)
        images = [image_base(p) if image_base else p for p in paths]
        events: list = []
    elif task in TASKS:
        src = image_tag if image_src is None else image_src
        if task != "text" and image_tag is None:
            raise BadSample("missing_field", f"{task} record has no image")
        prefix, label_text, events = pretraining_texts(task, record, opts, image_size_fn, src)
        if task != "text":
            if "<img>" in prefix or "<img>" in label_text:
                raise BadSample("bad_image_tag", "an <img> tag inside a pre-training text field")
            prefix = f"<img>{image_tag}</img>" + prefix
        p_ids = _encode(tok, prefix) if prefix else []
        l_ids = _encode(tok, label_text) + [tok.eod_id]
        ids = p_ids + l_ids
        labels = [False] * len(p_ids) + [True] * len(l_ids)
        images = [src] if task != "text" else []
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return Example(
        ids=np.asarray(ids, np.int32),
        labels=np.asarray(labels, bool),
        images=images,
        source=source,
        index=index,
        events=tuple(events),
    )
