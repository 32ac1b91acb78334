"""PDF pages as OCR data (Appendix A.4): PyMuPDF renders each page and gives every text span's box.

  python -m qwenvl_jax.prep pdf --input='pdfs/*.pdf' --output=out/pdf [--dpi=100] [--level=span]

The paper's steps: (1) extract all texts and their boxes per page, (2) render the page to an image,
then drop (3) too small pages, (4) pages with too many or too few characters, (5) pages with
Latin Extended-A/B characters, (6) pages with Private Use Area characters (`ocr_page.PageFilters`;
the thresholds are flags). Each kept page is one `ocr` record: the PNG and its text spans with
their quads in the PNG's pixels (rotated pages included), which the trainer turns into the
paper's `<ref>text</ref><quad>...</quad>` text.

An input is a `.pdf` (one shard: its pages) or a text file listing PDF paths, one a line (one
shard: all their pages), so a large collection runs as a few thousand shards.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Iterator

from PIL import Image

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError, MissingPathError, optional_import
from qwenvl_jax.prep import ocr_page
from qwenvl_jax.prep.ocr_page import OcrPage, TextLine
from qwenvl_jax.prep.steps import Step

HELP = "A.4: PDF pages rendered with PyMuPDF, every text span's box, the paper's page filters"
LEVELS = ("span", "line")


def _pymupdf():
    return optional_import("pymupdf", "prep")


def pdf_pages(
    data: bytes, *, dpi: float = 100.0, level: str = "span", name: str = "doc"
) -> Iterator[OcrPage]:
    """Every page of a PDF, rendered, with its texts and their quads in the image's pixels.

    Args:
      data: the PDF file's bytes.
      dpi: the rendering resolution (72 = one pixel per PDF point).
      level: "span" (PyMuPDF's spans: runs of one font) or "line" (a line's spans joined).
      name: the document's name, for the page keys (`name-p0003`).

    Raises:
      ConfigError: the bytes are not a PDF PyMuPDF can open, or an unknown level.
    """
    if level not in LEVELS:
        raise ConfigError(f"--level={level}: choose from {', '.join(LEVELS)}")
    pymupdf = _pymupdf()
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except (RuntimeError, ValueError) as e:  # pymupdf.FileDataError derives from RuntimeError
        raise ConfigError(f"{name}: not a readable PDF ({e})") from None
    zoom = dpi / 72.0
    with doc:
        for number, page in enumerate(doc):
            # Text comes in unrotated page coordinates; the rendering shows the rotated page.
            to_pixels = page.rotation_matrix * pymupdf.Matrix(zoom, zoom)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
            image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
            lines = []
            for block in page.get_text("dict")["blocks"]:
                for line in block.get("lines", ()):
                    items = [(s["text"], s["bbox"]) for s in line["spans"]]
                    if level == "line" and items:
                        text = "".join(t for t, _ in items)
                        box = functools.reduce(
                            lambda a, b: a | b, (pymupdf.Rect(b) for _, b in items)
                        )
                        items = [(text, box)]
                    for text, bbox in items:
                        if not text.strip():
                            continue
                        q = pymupdf.Rect(bbox).quad * to_pixels
                        quad = (q.ul.x, q.ul.y, q.ur.x, q.ur.y, q.lr.x, q.lr.y, q.ll.x, q.ll.y)
                        quad = ocr_page.clip_quad(quad, pix.width, pix.height)
                        if quad is not None:
                            lines.append(TextLine(text.strip(), quad))
            yield OcrPage(image, lines, key=f"{name}-p{number:04d}")


def read_pdfs(path: str, *, dpi: float = 100.0, level: str = "span") -> Iterator[dict]:
    """The `ocr` records of every page of a `.pdf`, or of the PDFs a list file names."""
    for p in ocr_page.input_paths(path, (".pdf",)):
        try:
            data = fileio.read_bytes(p)
        except FileNotFoundError:
            raise MissingPathError(f"{path}: PDF not found: {p}") from None
        stem = posixpath.basename(os.fspath(p)).rsplit(".", 1)[0]
        for page in pdf_pages(data, dpi=dpi, level=level, name=stem):
            yield page.record()


def add_arguments(p) -> None:
    p.add_argument("--dpi", type=float, default=100.0, help="rendering resolution")
    p.add_argument("--level", default="span", choices=LEVELS, help="one box per span or per line")
    ocr_page.add_filter_arguments(p, ocr_page.PDF_FILTERS)


def run(args, pipeline_args) -> dict:
    from qwenvl_jax.prep import runner

    if args.dpi <= 0:
        raise ConfigError(f"--dpi={args.dpi} must be > 0")
    _pymupdf()  # a missing extra fails here, in one line, before any shard starts
    filters = ocr_page.filters_from(args, ocr_page.PDF_FILTERS)
    steps = [Step("page_filters", functools.partial(ocr_page.filter_pages, filters=filters))]
    return runner.run(
        steps,
        args.input,
        args.output,
        seed=args.seed,
        runner=args.runner,
        pipeline_args=pipeline_args,
        reader=functools.partial(read_pdfs, dpi=args.dpi, level=args.level),
        mixture={"train": {"task": "ocr", "box_format": "xyxy_pixel"}},
    )
