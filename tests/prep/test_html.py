"""HTML pages: a page this test writes, rendered by headless Chromium, comes back as the texts and
boxes it laid out; the command keeps and drops pages by the paper's HTML filters.

These tests need Debian's `chromium` package (apt-get install chromium); CI installs only pip
packages, so there they are skipped (the reason says so)."""

import json
import os

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageFont

from qwenvl_jax.data import tasks
from qwenvl_jax.prep import __main__ as prep_main
from qwenvl_jax.prep import html

pytestmark = pytest.mark.skipif(
    html.find_browser() is None, reason="needs Debian's chromium package (not installed on CI)"
)

TTF = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
HEAD = f"""<!doctype html><html><head><meta charset="utf-8"><style>
@font-face {{ font-family: T; src: url("file://{TTF}"); }}
body {{ margin: 0; font-family: T; color: #000; background: #fff; }}
.a {{ position: absolute; white-space: nowrap; }}
</style></head><body>"""
# (text, left, top, font size, line height) of absolutely placed one-line texts.
PLACED = [
    ("Qwen-VL reads web pages", 50, 30, 24, 40),
    ("boxes from the DOM", 300, 200, 16, 20),
    ("0123456789 !?", 120, 480, 32, 36),
]
PARAGRAPH = ("a paragraph that wraps over several lines of text here", 40, 300, 200, 20, 30)


def _page_html() -> str:
    parts = [HEAD]
    for text, x, y, fs, lh in PLACED:
        style = f"left:{x}px;top:{y}px;font-size:{fs}px;line-height:{lh}px"
        parts.append(f'<div class="a" style="{style}">{text}</div>')
    text, x, y, w, fs, lh = PARAGRAPH
    style = f"position:absolute;margin:0;left:{x}px;top:{y}px;width:{w}px;font-size:{fs}px;"
    parts.append(f'<p style="{style}line-height:{lh}px">{text}</p>')
    parts.append('<div class="a" style="left:20px;top:600px;font-size:16px">in <b>bold</b> too ')
    parts.append('and<i>joined</i></div><div style="display:none">hidden text</div>')
    parts.append('<script>var s = "script text";</script></body></html>')
    return "".join(parts)


def _wrap(text: str, width: float, font: ImageFont.FreeTypeFont) -> list[str]:
    """Greedy line breaking at spaces, as a browser breaks a paragraph of one font."""
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and font.getlength(trial) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur]


@pytest.fixture(scope="module")
def browser():
    with html.Chromium() as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "page.html"
    path.write_text(_page_html(), encoding="utf-8")
    return browser.page(f"file://{path}", width=640)


def test_texts_and_boxes_are_where_the_page_put_them(page):
    assert page.image.size == (640, 768)
    got = {ln.text: ln.quad for ln in page.lines}
    for text, x, y, fs, lh in PLACED:
        font = ImageFont.truetype(TTF, fs)
        ascent, descent = font.getmetrics()
        x1, y1, x2, _, _, y2, _, _ = got[text]
        assert abs(x1 - x) <= 1 and abs(x2 - (x + font.getlength(text))) <= 2
        assert abs((y1 + y2) / 2 - (y + lh / 2)) <= 2  # centred in its line box
        assert abs((y2 - y1) - (ascent + descent)) <= 3
    text, x, y, w, fs, lh = PARAGRAPH
    wrapped = _wrap(text, w, ImageFont.truetype(TTF, fs))
    assert len(wrapped) >= 3
    para = [ln for ln in page.lines if ln.text in wrapped]
    assert [ln.text for ln in para] == wrapped
    for i, ln in enumerate(para):
        assert (
            abs(ln.quad[0] - x) <= 1
            and abs((ln.quad[1] + ln.quad[5]) / 2 - (y + (i + 0.5) * lh)) <= 2
        )
    # Inline elements join their line; hidden and script text is not on the page.
    assert "in bold too andjoined" in got
    assert not any("hidden" in t or "script" in t for t in got)


def test_ink_is_inside_the_boxes(page):
    dark = np.asarray(page.image.convert("L")) < 128
    covered = np.zeros_like(dark)
    for ln in page.lines:
        x1, y1, _, _, x2, y2, _, _ = (int(round(v)) for v in ln.quad)
        assert dark[y1:y2, x1:x2].mean() > 0.05, ln.text
        covered[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = True
    # Nothing dark outside the boxes but an antialiased pixel of an overhanging glyph.
    assert dark.sum() > 1000 and (dark & ~covered).sum() <= 0.001 * dark.sum()


def test_command_filters_pages_and_writes_ocr_records(tmp_path):
    pages = {
        "kept": "<p>An ordinary page with enough characters.</p>",
        "latin": "<p>Łódź: Latin Extended-A stays (the paper filters it for PDFs only).</p>",
        "pua": "<p>A private use character \ue000 drops the page.</p>",
        "few": "<p>Hi</p>",
    }
    names = []
    for name, body in pages.items():
        (tmp_path / f"{name}.html").write_text(HEAD + body + "</body></html>", encoding="utf-8")
        names.append(f"{name}.html")
    listing = tmp_path / "shard0.txt"
    listing.write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    assert prep_main.main(["html", f"--input={listing}", f"--output={out}", "--width=400"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["records_in"] == 4 and report["records_out"] == 2
    dropped = report["steps"]["page_filters"]["dropped"]
    assert dropped == {"private_use": 1, "too_few_chars": 1}
    recs = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == ["kept-00000", "latin-00001"]
    rec = recs[1]
    assert Image.open(out / rec["image"]).size == (rec["width"], rec["height"]) == (400, 768)
    _, label, _ = tasks.pretraining_texts("ocr", rec, tasks.TaskOptions())
    assert label.startswith(" <ref>Łódź: Latin Extended-A stays")
