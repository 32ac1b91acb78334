"""PDF pages: a PDF this test writes with PyMuPDF comes back as the texts and boxes it wrote, the
page filters drop what the paper drops, and the command writes trainer-ready `ocr` records."""

import json
import os

import matplotlib
import numpy as np
import pymupdf
import pytest
from PIL import Image

from qwenvl_jax.data import tasks
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.prep import __main__ as prep_main
from qwenvl_jax.prep import ocr_page, pdf

TTF = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
DEJAVU = os.path.join(TTF, "DejaVuSans.ttf")
STIX_PUA = os.path.join(TTF, "STIXNonUni.ttf")  # its glyphs sit at Private Use code points
DPI = 144  # 2 pixels per PDF point

# (text, baseline point (x, y), font size) on the first page.
SPANS = [
    ("Qwen-VL reads documents", (72, 100), 24),
    ("page filters, boxes and text", (90, 200), 14),
    ("0123456789 café", (300, 420), 18),
]


def _page(doc, texts, *, size=(595, 842), font=DEJAVU, rotate=0):
    page = doc.new_page(width=size[0], height=size[1])
    page.insert_font(fontname="F0", fontfile=font)
    for text, point, fs in texts:
        page.insert_text(point, text, fontname="F0", fontsize=fs)
    if rotate:
        page.set_rotation(rotate)
    return page


def _expected_box(text, point, fs, font=DEJAVU):
    """The box from what the test wrote: the advance width of the string, and the font's ascender
    and descender around the baseline."""
    f = pymupdf.Font(fontfile=font)
    x, y = point
    return (x, y - f.ascender * fs, x + f.text_length(text, fontsize=fs), y - f.descender * fs)


@pytest.fixture(scope="module")
def pdf_bytes():
    doc = pymupdf.open()
    _page(doc, SPANS)
    _page(doc, [("a page turned by 90 degrees", (60, 120), 20)], rotate=90)
    many = "".join(f"line {i:02d} of a page with far too many characters\n" for i in range(100))
    _page(doc, [(many, (40, 40), 6)])  # 3700 non-space characters: too many
    _page(doc, [("tiny", (5, 50), 10)], size=(100, 100))  # too small
    _page(doc, [("Hi", (72, 72), 12)])  # too few characters
    _page(doc, [("Łódź is a city in Poland", (72, 72), 12)])  # Latin Extended-A
    _page(doc, [("\ue000\ue001\ue002\ue003\ue004\ue005 glyphs", (72, 72), 12)], font=STIX_PUA)
    data = doc.tobytes()
    doc.close()
    return data


def test_texts_and_boxes_are_what_was_written(pdf_bytes):
    page = next(pdf.pdf_pages(pdf_bytes, dpi=DPI))
    assert page.image.size == (595 * 2, 842 * 2)
    assert [ln.text for ln in page.lines] == [t for t, _, _ in SPANS]
    for ln, (text, point, fs) in zip(page.lines, SPANS, strict=True):
        want = np.asarray(_expected_box(text, point, fs)) * DPI / 72
        got = np.asarray(ln.quad)
        # An axis-aligned quad, clockwise from the top-left, on the written position.
        x1, y1, x2, y2 = want
        np.testing.assert_allclose(got, [x1, y1, x2, y1, x2, y2, x1, y2], atol=2.0)
    # The ink is inside the boxes: dark pixels of the rendering, all covered by some box.
    dark = np.asarray(page.image.convert("L")) < 128
    covered = np.zeros_like(dark)
    for ln in page.lines:
        x1, y1, _, _, x2, y2, _, _ = (int(round(v)) for v in ln.quad)
        assert dark[y1:y2, x1:x2].mean() > 0.05
        covered[y1:y2, x1:x2] = True
    assert (dark & ~covered).sum() < 0.01 * dark.sum()


def test_rotated_page_boxes_follow_the_rendering(pdf_bytes):
    page = list(pdf.pdf_pages(pdf_bytes, dpi=72))[1]
    assert page.image.size == (842, 595)  # the rotated page's image is landscape
    (ln,) = page.lines
    xs, ys = ln.quad[0::2], ln.quad[1::2]
    x1, x2, y1, y2 = (int(round(v)) for v in (min(xs), max(xs), min(ys), max(ys)))
    assert y2 - y1 > 3 * (x2 - x1)  # the text runs down the page now
    dark = np.asarray(page.image.convert("L")) < 128
    inside = dark[y1:y2, x1:x2].sum()
    assert inside > 100 and inside >= 0.99 * dark.sum()


def test_line_level_joins_spans():
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_font(fontname="F0", fontfile=DEJAVU)
    page.insert_font(fontname="F1", fontfile=os.path.join(TTF, "DejaVuSans-Bold.ttf"))
    page.insert_text((72, 100), "regular ", fontname="F0", fontsize=12)
    x = 72 + pymupdf.Font(fontfile=DEJAVU).text_length("regular ", fontsize=12)
    page.insert_text((x, 100), "bold", fontname="F1", fontsize=12)
    data = doc.tobytes()
    spans = next(pdf.pdf_pages(data, dpi=72, level="span")).lines
    lines = next(pdf.pdf_pages(data, dpi=72, level="line")).lines
    assert [s.text for s in spans] == ["regular", "bold"]
    assert [ln.text for ln in lines] == ["regular bold"]
    assert lines[0].quad[0] == spans[0].quad[0] and lines[0].quad[2] == spans[1].quad[2]


@pytest.mark.parametrize(
    "reason, drop, keep",
    [
        ("too_small", (223, 500, "x" * 50), (224, 224, "x" * 50)),
        ("too_few_chars", (500, 500, "123456789 "), (500, 500, "1234567890")),
        ("too_many_chars", (500, 500, "x" * 101), (500, 500, "x" * 100 + " \n")),
        ("latin_extended", (500, 500, "Łódź " * 3), (500, 500, "café, naïve, Æsir ÿ")),
        ("latin_extended", (500, 500, "ǅ is Latin Ext-B ɏ"), (500, 500, "ɐ is IPA, after it")),
        ("private_use", (500, 500, "glyph \ue000 here"), (500, 500, "glyph \uf900 here")),
        (
            "private_use",
            (500, 500, "plane fifteen \U000f0000"),
            (500, 500, "an emoji \U0001f600 is fine"),
        ),
    ],
)
def test_each_filter_drops_and_keeps(reason, drop, keep):
    f = ocr_page.PageFilters(min_chars=10, max_chars=100)
    w, h, text = drop
    assert ocr_page.reject_reason(w, h, [text], f) == reason
    w, h, text = keep
    assert ocr_page.reject_reason(w, h, [text], f) is None
    if reason == "latin_extended":  # the paper's HTML filters keep Latin Extended pages
        html = ocr_page.PageFilters(min_chars=10, max_chars=100, latin_extended=False)
        assert ocr_page.reject_reason(*drop[:2], [drop[2]], html) is None


def test_command_writes_ocr_records_and_counts(pdf_bytes, tmp_path):
    src = tmp_path / "docs" / "doc.pdf"
    src.parent.mkdir()
    src.write_bytes(pdf_bytes)
    out = tmp_path / "out"
    argv = ["pdf", f"--input={src}", f"--output={out}", "--dpi=72"]
    assert prep_main.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["records_in"] == 7 and report["records_out"] == 2
    assert report["steps"]["page_filters"]["dropped"] == {
        "too_many_chars": 1,
        "too_small": 1,
        "too_few_chars": 1,
        "latin_extended": 1,
        "private_use": 1,
    }
    recs = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == ["doc-p0000", "doc-p0001"]
    mixture = json.loads((out / "mixture.json").read_text())
    (entry,) = mixture["sources"].values()
    assert entry["task"] == "ocr" and entry["box_format"] == "xyxy_pixel"
    rec = recs[0]
    img = Image.open(out / rec["image"])
    assert img.size == (rec["width"], rec["height"]) == (595, 842)
    _, label, events = tasks.pretraining_texts("ocr", rec, tasks.TaskOptions())
    assert label.startswith(" <ref>Qwen-VL reads documents</ref><quad>(") and events == []
    # A rerun finds every shard done and writes the same file.
    before = (out / "train.jsonl").read_bytes()
    assert prep_main.main(argv) == 0
    assert (out / "train.jsonl").read_bytes() == before


def test_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"not a pdf at all")
    assert prep_main.main(["pdf", f"--input={bad}", f"--output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad: not a readable PDF")
    with pytest.raises(ConfigError, match="--level=word"):
        next(pdf.pdf_pages(b"", level="word"))
