"""Grounding text of Qwen-VL: `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`, parsing and drawing.

Coordinates are integers normalised to [0, 1000) with (x1, y1) the top-left and (x2, y2) the
bottom-right corner; `<quad>(x1,y1),...,(x4,y4)</quad>` holds four corners. Pixel coordinates follow
the published `draw_bbox_on_latest_picture`: `int(x / 1000 * width)`, `int(y / 1000 * height)`.

`to_list_format` and `boxes_with_ref` reproduce the published tokenizer helpers of the same names
(checked against fixtures); `parse_grounding` is the richer parser (every box after a ref gets the
ref, quads included, pixel boxes) that `draw_boxes` uses.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_TAGS = {"<img>": "image", "<ref>": "ref", "<box>": "box", "<quad>": "quad"}
_STRIP_RE = re.compile(r"<ref>(.*?)</ref>(?:<box>.*?</box>)*(?:<quad>.*?</quad>)*", re.S)
_START_RE = re.compile("|".join(re.escape(t) for t in _TAGS))
# Matplotlib's TABLEAU colours, used in order (the reference picks them at random).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def box_text(box: Sequence[int]) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` for a box already on the [0, 1000) grid."""
    x1, y1, x2, y2 = box
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def ref_text(phrase: str, boxes: Sequence[Sequence[int]]) -> str:
    """`<ref>phrase</ref><box>..</box>...` for boxes already on the [0, 1000) grid."""
    return f"<ref>{phrase}</ref>" + "".join(box_text(b) for b in boxes)


def quad_text(quad: Sequence[int]) -> str:
    """`<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>` for 8 numbers on the [0, 1000) grid."""
    pts = ",".join(f"({quad[i]},{quad[i + 1]})" for i in range(0, 8, 2))
    return f"<quad>{pts}</quad>"


# The published `evaluate_grounding.py`'s box pattern; it reads the first match.
_PAIR_RE = re.compile(r"\((.*?)\),\((.*?)\)")


def first_box(text: str) -> tuple[float, float, float, float]:
    """The first `(x1,y1),(x2,y2)` in `text` as 4 floats, as the published grounding evaluation
    reads an answer: the first match of its pattern, `<box>` tags not required, coordinates kept
    as written (the [0, 1000) grid; nothing clipped or sorted); (0, 0, 0, 0) when there is no
    match or it does not hold two numbers per corner.

    The benchmark metric (`eval.metrics.grounding_iou`) and the demo's evaluation both read boxes
    with it."""
    m = _PAIR_RE.search(text)
    if m is None:
        return (0.0, 0.0, 0.0, 0.0)
    try:
        x1, y1 = (float(v) for v in m.group(1).split(","))
        x2, y2 = (float(v) for v in m.group(2).split(","))
    except ValueError:
        return (0.0, 0.0, 0.0, 0.0)
    return (x1, y1, x2, y2)


def to_list_format(text: str) -> list[dict[str, str]]:
    """Split text into `{'text'|'image'|'ref'|'box'|'quad': str}` items (the published helper).

    Raises:
      ValueError: a start tag (`<img>`, `<ref>`, `<box>`, `<quad>`) without its end tag.
    """
    text = unicodedata.normalize("NFC", text)
    out, pos = [], 0
    while True:
        m = _START_RE.search(text, pos)
        if m is None:
            break
        if m.start() > pos:
            out.append({"text": text[pos : m.start()]})
        end_tag = "</" + m.group()[1:]
        end = text.find(end_tag, m.end())
        if end < 0:
            raise ValueError(
                f"Unclosed {m.group()} at character {m.start()}: {text[m.start() :][:60]!r}"
            )
        out.append({_TAGS[m.group()]: text[m.end() : end]})
        pos = end + len(end_tag)
    if pos < len(text):
        out.append({"text": text[pos:]})
    return out


def _ints(body: str, n: int, kind: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in body.replace("(", "").replace(")", "").split(","))
    except ValueError:
        raise ValueError(f"<{kind}>{body}</{kind}> does not hold integer coordinates") from None
    if len(vals) != n:
        raise ValueError(f"<{kind}>{body}</{kind}> holds {len(vals)} numbers, expected {n}")
    return vals


def boxes_with_ref(text: str) -> list[dict]:
    """The published `_fetch_all_box_with_ref`: every `<box>` with the ref right before it (if any).

    Returns:
      list of `{'box': (x1, y1, x2, y2)}` plus `'ref'` (stripped) when the element just before the
      box is a `<ref>`; so of several boxes after one ref only the first carries it.
    """
    items = to_list_format(text)
    out = []
    for i, item in enumerate(items):
        if "box" in item:
            rec = {"box": _ints(item["box"], 4, "box")}
            if i > 0 and "ref" in items[i - 1]:
                rec["ref"] = items[i - 1]["ref"].strip()
            out.append(rec)
    return out


@dataclasses.dataclass(frozen=True)
class GroundedBox:
    """One box or quad of a grounded response.

    Attributes:
      ref: the phrase of the closest `<ref>` before it with only boxes/quads in between, else None.
      kind: "box" or "quad".
      coords: normalised integers in [0, 1000): (x1, y1, x2, y2) or the 8 quad corner coordinates.
      pixels: coords scaled to the image size with `int(v / 1000 * size)`, or None without a size.
    """

    ref: str | None
    kind: str
    coords: tuple[int, ...]
    pixels: tuple[int, ...] | None = None


def to_pixels(coords: Sequence[int], width: int, height: int) -> tuple[int, ...]:
    """Normalised [0, 1000) x, y pairs to pixels, as the published drawing code scales them."""
    return tuple(int(v / 1000 * (width if k % 2 == 0 else height)) for k, v in enumerate(coords))


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> list[GroundedBox]:
    """All boxes and quads of `text` with their ref phrase and, given (width, height), pixel coords.

    A ref applies to every box and quad that follows it until other text or another ref.
    """
    out, ref = [], None
    for item in to_list_format(text):
        if "ref" in item:
            ref = item["ref"].strip()
        elif "box" in item or "quad" in item:
            kind = "box" if "box" in item else "quad"
            coords = _ints(item[kind], 4 if kind == "box" else 8, kind)
            pixels = to_pixels(coords, *image_size) if image_size is not None else None
            out.append(GroundedBox(ref, kind, coords, pixels))
        else:
            ref = None
    return out


def strip_grounding(text: str) -> str:
    """Replace `<ref>p</ref><box>..</box>...` by `p` (the published tutorial's regex)."""
    return _STRIP_RE.sub(r"\1", text)


def latest_image(response: str, history: Sequence[tuple[str, str | None]] | None = None):
    """The last `<img>` path in the response, else in the history's queries, newest first."""
    turns = list(history or []) + [(response, None)]
    for query, _ in reversed(turns):
        for item in reversed(to_list_format(query)):
            if "image" in item:
                return item["image"]
    return None


def draw_boxes(
    image,
    boxes: Sequence[GroundedBox] | str,
    *,
    width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """Draw boxes (and quads) with their ref labels onto a copy of an image.

    Args:
      image: a PIL image, a uint8 [H, W, 3] array, or a path.
      boxes: `parse_grounding` records, or a grounded response string to parse.
      width: line width in pixels (default scales with the image).
      font_size: label size (default scales with the image); PIL's bundled default font is used, so
        nothing is downloaded (characters outside Latin may render as boxes).

    Returns:
      an RGB PIL image of the same size.
    """
    if isinstance(image, np.ndarray):
        img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    elif isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        try:
            img = Image.open(image).convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {image}") from None
    w, h = img.size
    if isinstance(boxes, str):
        boxes = parse_grounding(boxes, (w, h))
    scale = max((w * h) ** 0.5, 1.0)
    line = width or max(int(scale / 120), 1)
    size = font_size or max(int(scale / 30), 12)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    colours, colour = {}, PALETTE[0]
    for b in boxes:
        pix = b.pixels if b.pixels is not None else to_pixels(b.coords, w, h)
        if b.ref is not None:
            colour = colours.setdefault(b.ref, PALETTE[len(colours) % len(PALETTE)])
        if b.kind == "box":
            x1, y1, x2, y2 = pix
            draw.rectangle(
                (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=colour, width=line
            )
        else:
            pts = list(zip(pix[0::2], pix[1::2], strict=True))
            draw.line(pts + pts[:1], fill=colour, width=line)
        if b.ref:
            x, y = pix[0], pix[1]
            left, top, right, bottom = draw.textbbox((x, y), b.ref, font=font)
            draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill="black")
            draw.text((x, y), b.ref, fill=colour, font=font)
    return img


def draw_bbox_on_latest_picture(
    response: str,
    history: Sequence[tuple[str, str | None]] | None = None,
    *,
    allow_urls: bool = False,
) -> Image.Image | None:
    """The published helper of this name: the boxes of `response` drawn on the latest `<img>`.

    Returns:
      the drawn image, or None when there is no image or no box (as the published code).
    """
    src = latest_image(response, history)
    if src is None:
        return None
    boxes = [b for b in parse_grounding(response) if b.kind == "box"]
    if not boxes:
        return None
    if src.startswith(("http://", "https://")):
        if not allow_urls:
            raise ValueError(f"latest image is a URL ({src}); pass allow_urls=True to fetch it")
        import io
        import urllib.request

        with urllib.request.urlopen(src, timeout=30) as r:
            src = io.BytesIO(r.read())
    return draw_boxes(src, boxes)
