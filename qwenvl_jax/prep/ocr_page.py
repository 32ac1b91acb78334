"""OCR pages (Appendix A.4): an image, its text lines with quadrilaterals, and the page filters.

The three OCR generators (`ocr_synth` for SynthDoG-style pages, `pdf` for PyMuPDF pages, `html`
for Chromium pages) all produce `OcrPage`s; `OcrPage.record` turns one into the trainer's `ocr`
record (`qwenvl_jax/data/tasks.py`): `{"image", "width", "height", "lines": [{"text", "quad"}]}`
with each quad as 8 pixel numbers of the *original* image, clockwise from the top-left corner.
The trainer's `ocr` task normalises them to the 1000-grid with `normalize_quad` and writes the
paper's `<ref>line</ref><quad>(x1,y1),...,(x4,y4)</quad>` text (`grounding.quad_text`), so the
frame of the boxes is fixed here, once, by the image the page was rendered to.

The page filters are the paper's list for PDF pages (A.4 steps 3-6: too small, too many or too
few characters, Latin Extended-A/B, Private Use Area); HTML pages use the same minus the Latin
Extended one (the paper's HTML list omits it). The paper gives no thresholds; the defaults are
ours and named in `PageFilters`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import unicodedata
from collections.abc import Sequence

from PIL import Image

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.prep.steps import Drop

# Reasons a page is dropped, in the order the filters run (the counts a run reports use them).
FILTERS = ("too_small", "too_few_chars", "too_many_chars", "latin_extended", "private_use")


@dataclasses.dataclass(frozen=True)
class TextLine:
    """One text item of a page.

    Attributes:
      text: the text as rendered.
      quad: 8 pixel coordinates (x1, y1, ..., x4, y4) of the corners top-left, top-right,
        bottom-right, bottom-left, in the page image's pixel frame.
      font: the font file it was drawn with, where the generator knows it (synthetic pages).
      font_size: the font size in pixels before any page warp (synthetic pages).
    """

    text: str
    quad: tuple[float, ...]
    font: str | None = None
    font_size: int | None = None


@dataclasses.dataclass
class OcrPage:
    """A rendered page with its text lines.

    Attributes:
      image: the RGB page image.
      lines: its text lines, in reading order of the generator.
      key: a stable name for the page (source file + page number, or generator seed + index).
      quality: JPEG quality to encode it with (synthetic pages vary it as SynthDoG does), or None
        for PNG.
    """

    image: Image.Image
    lines: list[TextLine]
    key: str = ""
    quality: int | None = None

    def encoded(self) -> bytes:
        """The image as JPEG (at `quality`) or PNG bytes."""
        buf = io.BytesIO()
        if self.quality is None:
            self.image.save(buf, format="PNG")
        else:
            self.image.convert("RGB").save(buf, format="JPEG", quality=int(self.quality))
        return buf.getvalue()

    def record(self) -> dict:
        """The trainer's `ocr` record (pixel quads; `box_format: xyxy_pixel`), with the encoded
        image under `image` and its extension under `image_ext` (the prep writer stores it)."""
        w, h = self.image.size
        lines = [{"text": ln.text, "quad": [round(v, 2) for v in ln.quad]} for ln in self.lines]
        return {
            "key": self.key,
            "image": self.encoded(),
            "image_ext": "png" if self.quality is None else "jpg",
            "width": w,
            "height": h,
            "lines": lines,
        }


def input_paths(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """`path` itself when it ends in one of `suffixes` (a .pdf, an .html page), else a list file:
    one path per line (blank lines and `#` comments skipped), relative ones from its folder."""
    if path.lower().endswith(suffixes):
        return [path]
    root = posixpath.dirname(os.fspath(path)) or "."
    out = []
    for line in fileio.read_text(path).splitlines():
        p = line.strip()
        if p and not p.startswith("#"):
            out.append(p if fileio.is_remote(p) or os.path.isabs(p) else fileio.join(root, p))
    return out


def box_quad(x1: float, y1: float, x2: float, y2: float) -> tuple[float, ...]:
    """The 4 corners (clockwise from top-left) of an axis-aligned box, as 8 numbers."""
    return (x1, y1, x2, y1, x2, y2, x1, y2)


def clip_quad(quad: Sequence[float], width: int, height: int) -> tuple[float, ...] | None:
    """The quad with its corners clipped into the image, or None when it lies wholly outside or
    nothing of it is left (a line scrolled off a rendered page)."""
    xs, ys = quad[0::2], quad[1::2]
    if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= width or min(ys) >= height:
        return None
    out = []
    for i, v in enumerate(quad):
        out.append(min(max(float(v), 0.0), float(width if i % 2 == 0 else height)))
    if max(out[0::2]) - min(out[0::2]) < 1 or max(out[1::2]) - min(out[1::2]) < 1:
        return None
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class PageFilters:
    """The paper's page filters (A.4); the thresholds are ours (the paper gives none).

    Attributes:
      min_width, min_height: "removing too small image": pages below either size (in rendered
        pixels) are dropped.
      min_chars, max_chars: "too many or too few characters": non-space characters over all lines.
      latin_extended: drop pages with a character in Latin Extended-A (U+0100-U+017F) or
        Latin Extended-B (U+0180-U+024F) (PDF pages; the paper's HTML list has no such step).
      private_use: drop pages with a Private Use character (Unicode category Co: the BMP block
        U+E000-U+F8FF and the supplementary planes 15-16) - often an unmapped PDF glyph.
    """

    min_width: int = 224
    min_height: int = 224
    min_chars: int = 10
    max_chars: int = 3000
    latin_extended: bool = True
    private_use: bool = True


PDF_FILTERS = PageFilters()
HTML_FILTERS = PageFilters(latin_extended=False)


def _latin_extended(c: str) -> bool:
    return 0x0100 <= ord(c) <= 0x024F


def reject_reason(
    width: int, height: int, texts: Sequence[str], filters: PageFilters
) -> str | None:
    """The first filter of `FILTERS` that drops a page of this size and text, or None to keep it."""
    if width < filters.min_width or height < filters.min_height:
        return "too_small"
    text = "".join(texts)
    n = sum(not c.isspace() for c in text)
    if n < filters.min_chars:
        return "too_few_chars"
    if n > filters.max_chars:
        return "too_many_chars"
    if filters.latin_extended and any(_latin_extended(c) for c in text):
        return "latin_extended"
    if filters.private_use and any(unicodedata.category(c) == "Co" for c in text):
        return "private_use"
    return None


def filter_pages(record: dict, ctx, filters: PageFilters):
    """The page filters as a prep step over `OcrPage.record`s: drops with the filter's name."""
    texts = [ln["text"] for ln in record["lines"]]
    reason = reject_reason(record["width"], record["height"], texts, filters)
    if reason is not None:
        raise Drop(reason)
    yield record


def add_filter_arguments(p, defaults: PageFilters) -> None:
    """The page filters' thresholds as flags (the `pdf` and `html` commands)."""
    d = defaults
    p.add_argument("--min_width", type=int, default=d.min_width, help="drop narrower pages (px)")
    p.add_argument("--min_height", type=int, default=d.min_height, help="drop shorter pages (px)")
    p.add_argument("--min_chars", type=int, default=d.min_chars, help="drop pages with fewer")
    p.add_argument("--max_chars", type=int, default=d.max_chars, help="drop pages with more")


def filters_from(args, base: PageFilters) -> PageFilters:
    """`base` with the thresholds the flags set.

    Raises:
      ConfigError: a negative threshold, or --min_chars above --max_chars.
    """
    for k in ("min_width", "min_height", "min_chars", "max_chars"):
        if getattr(args, k) < 0:
            raise ConfigError(f"--{k}={getattr(args, k)} must be >= 0")
    if args.min_chars > args.max_chars:
        raise ConfigError(f"--min_chars={args.min_chars} exceeds --max_chars={args.max_chars}")
    return dataclasses.replace(
        base,
        min_width=args.min_width,
        min_height=args.min_height,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
    )
