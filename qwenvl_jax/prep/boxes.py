"""The one way prepared data gets its boxes: validated in the ORIGINAL image's pixels, then put on
Qwen-VL's [0, 1000) grid, so later resizing can never move them.

A box given in pixels belongs to the image its annotation was made on. `grid_box` checks it there
(finite numbers, x1 < x2, y1 < y2, inside the image give or take `tolerance` pixels, which are
clipped: COCO's float boxes end up to a pixel past the edge) and quantises it with the trainer's
own rule (`data.tasks.normalize_box`: floor(v / size * 1000), at most 999). `check_size` compares
the size an annotation declares with the image file's own header: a mismatch (the image was
resized after annotation) is an error, never a silent rescale. Errors are `BoxError`s naming the
sample; the converters drop and count them (reason `BoxError.reason`) or stop with `--strict`.
The text is `grounding.ref_text` / `grounding.box_text`: the trainer's format, one owner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qwenvl_jax.data import tasks
from qwenvl_jax.errors import UserError

# COCO / RefCOCO boxes are floats that may end a fraction of a pixel past the image.
TOLERANCE_PX = 1.0


class BoxError(UserError, ValueError):
    """A box or an image size that cannot be trusted; `reason` is the drop counter's name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def grid_box(
    box: Sequence[float],
    width: float,
    height: float,
    *,
    fmt: str = "xyxy",
    sample: str = "",
    tolerance: float = TOLERANCE_PX,
) -> tuple[int, int, int, int]:
    """A pixel box of the original image as integer (x1, y1, x2, y2) on the [0, 1000) grid.

    Args:
      box: 4 numbers: (x1, y1, x2, y2) (`fmt="xyxy"`) or (x, y, w, h) (`fmt="xywh"`, COCO).
      width, height: the size of the image the box was annotated on.
      sample: names the sample in errors.
      tolerance: pixels a box may reach past the image edge (clipped to it).

    Raises:
      BoxError: not 4 finite numbers (`bad_box`), x1 >= x2 or y1 >= y2 (`box_inverted`), outside
        the image by more than `tolerance` (`box_outside_image`), no image size (`no_size`).
    """
    where = f"{sample}: " if sample else ""
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise BoxError("bad_box", f"{where}box {box!r} is not 4 numbers") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise BoxError("bad_box", f"{where}box {box!r} is not 4 finite numbers")
    if not (width and height and width > 0 and height > 0):
        raise BoxError("no_size", f"{where}image size {width}x{height} is not positive")
    x1, y1, a, b = vals
    x2, y2 = (x1 + a, y1 + b) if fmt == "xywh" else (a, b)
    if not (x1 < x2 and y1 < y2):
        msg = f"{where}box {box!r} ({fmt}) has x1 >= x2 or y1 >= y2"
        raise BoxError("box_inverted", msg)
    t = tolerance
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        msg = f"{where}box {box!r} ({fmt}) lies outside the {width:g}x{height:g} image"
        raise BoxError("box_outside_image", msg)
    x1, y1 = max(x1, 0.0), max(y1, 0.0)
    x2, y2 = min(x2, float(width)), min(y2, float(height))
    return tasks.normalize_box((x1, y1, x2, y2), "xyxy_pixel", width, height)


def check_size(declared: tuple[int, int], actual: tuple[int, int], sample: str = "") -> None:
    """The annotation's (width, height) must be the image file's: else the boxes are in another
    frame (the image was resized or swapped after annotation)."""
    if tuple(int(v) for v in declared) != tuple(int(v) for v in actual):
        where = f"{sample}: " if sample else ""
        raise BoxError(
            "size_mismatch",
            f"{where}annotation is for a {declared[0]}x{declared[1]} image but the file is"
            f" {actual[0]}x{actual[1]}: its boxes would land in the wrong place; use the original"
            " images",
        )
