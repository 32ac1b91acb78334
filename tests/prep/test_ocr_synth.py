"""Synthetic OCR pages: every tracked quad holds its own string's ink, and the record is the
trainer's `ocr` record whose `<quad>` text lands on the same pixels."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.data import tasks
from qwenvl_jax.grounding import GroundedBox, draw_boxes, parse_grounding
from qwenvl_jax.prep import ocr_synth

CORPUS = [
    "It is managed by the city council and open to the public every day of the year.",
    "Pack my box with five dozen liquor jugs; the quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow. 1984 was 42 years ago, give or take.",
]
# Small pages so 100 of them take a few seconds; fonts large enough for the ink to be legible.
SMALL = ocr_synth.SynthConfig(short_side=(192, 256), font_size=(12, 22), jpeg_quality=(90, 95))
N_PAGES = 100


@pytest.fixture(scope="module")
def fonts():
    fonts = ocr_synth.matplotlib_fonts()
    assert len(fonts) >= 10  # matplotlib's DejaVu set: pip-installed, so CI has it too
    return fonts


@pytest.fixture(scope="module")
def pages(fonts):
    return [ocr_synth.synth_page(i, CORPUS, fonts, seed=3, cfg=SMALL) for i in range(N_PAGES)]


def _coarse(a: np.ndarray, rows: int = 4) -> np.ndarray:
    """`a` averaged down to `rows` rows (about two cells per character): a one-pixel misregistration
    of thin strokes after the page's warp and blur must not matter, a misplaced box must."""
    h, w = a.shape
    size = (max(2, round(rows * w / h)), rows)
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize(size, Image.BOX))


def _match(image: Image.Image, quad, mask: np.ndarray) -> float:
    """Correlation of the quad's region (warped to the mask's size; darkness, as the text is dark
    on a light sheet) with the string's own ink mask."""
    x1, y1, x2, y2, x3, y3, x4, y4 = quad
    # PIL's QUAD data: the source corners upper-left, lower-left, lower-right, upper-right.
    crop = image.convert("L").transform(
        (mask.shape[1], mask.shape[0]), Image.QUAD, (x1, y1, x4, y4, x3, y3, x2, y2), Image.BILINEAR
    )
    dark = -np.asarray(crop, np.float32)
    return float(np.corrcoef(_coarse(dark).ravel(), _coarse(mask).ravel())[0, 1])


def _shifted(quad, frac_x, frac_y):
    q = np.asarray(quad, np.float64).reshape(4, 2)
    w = np.linalg.norm(q[1] - q[0])
    h = np.linalg.norm(q[3] - q[0])
    along = (q[1] - q[0]) / max(w, 1e-6)
    down = (q[3] - q[0]) / max(h, 1e-6)
    return tuple((q + along * frac_x * w + down * frac_y * h).flatten())


def test_quads_hold_their_strings_ink(pages, tmp_path):
    n_lines = sum(len(p.lines) for p in pages)
    assert len(pages) == N_PAGES and n_lines > 5 * N_PAGES
    scores, beaten = [], []
    for page in pages:
        w, h = page.image.size
        for ln in page.lines:
            xs, ys = ln.quad[0::2], ln.quad[1::2]
            assert min(xs) >= 0 and min(ys) >= 0 and max(xs) <= w and max(ys) <= h
            mask = ocr_synth.render_alone(ln.text, ln.font, ln.font_size)
            scores.append(_match(page.image, ln.quad, mask))
            # A box off by half a line, or by a fifth of its width, must match worse.
            for fx, fy in ((0.0, 0.5), (0.2, 0.0)):
                beaten.append(_match(page.image, _shifted(ln.quad, fx, fy), mask) < scores[-1])
    scores = np.asarray(scores)
    spread = np.percentile(scores, [1, 5, 50])
    assert spread[2] > 0.85 and spread[1] > 0.6, spread
    assert np.mean(beaten) > 0.99
    # The overlay a person looks at: the quads drawn over a page (in the test's tmp dir).
    boxes = [GroundedBox(None, "quad", (), tuple(int(v) for v in ln.quad)) for ln in pages[0].lines]
    draw_boxes(pages[0].image, boxes).save(tmp_path / "synth_quads.png")


def test_record_is_the_trainers_ocr_sample(pages):
    page = pages[7]
    rec = page.record()
    assert Image.open(io.BytesIO(rec["image"])).size == page.image.size
    prefix, label, events = tasks.pretraining_texts("ocr", rec, tasks.TaskOptions())
    assert prefix == "OCR with grounding:" and events == []
    boxes = parse_grounding(label, page.image.size)
    assert [b.ref for b in boxes] == [ln.text for ln in page.lines]
    w, h = page.image.size
    for b, ln in zip(boxes, page.lines, strict=True):
        assert b.kind == "quad"
        # Back on the pixels within one 1000-grid step of the page's own size.
        err = np.abs(np.asarray(b.pixels, float) - np.asarray(ln.quad))
        assert (err[0::2] <= w / 1000 + 1).all() and (err[1::2] <= h / 1000 + 1).all()


def test_deterministic_by_seed(fonts):
    a = ocr_synth.synth_page(5, CORPUS, fonts, seed=1, cfg=SMALL)
    b = ocr_synth.synth_page(5, CORPUS, fonts, seed=1, cfg=SMALL)
    c = ocr_synth.synth_page(5, CORPUS, fonts, seed=2, cfg=SMALL)
    assert a.encoded() == b.encoded() and a.lines == b.lines
    assert a.encoded() != c.encoded()


def test_photo_backgrounds_and_glyph_coverage(fonts, tmp_path):
    photo = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(photo)
    # CJK text: DejaVu has no glyphs for it, so those tokens are skipped, never drawn as tofu.
    page = ocr_synth.synth_page(
        0, ["中文字符 mixed with English words"], fonts, backgrounds=[str(photo)], cfg=SMALL
    )
    text = "".join(ln.text for ln in page.lines)
    assert text and not any("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_command_writes_trainer_records_resumably(fonts, tmp_path):
    from qwenvl_jax.prep import __main__ as prep_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    out = tmp_path / "out"
    font_dir = tmp_path / "fonts"
    font_dir.mkdir()
    for f in fonts[:3]:
        (font_dir / f.rsplit("/", 1)[-1]).symlink_to(f)
    argv = [
        "synthdog",
        f"--input={corpus}",
        f"--output={out}",
        "--pages=5",
        "--pages_per_shard=2",
        f"--fonts={font_dir}",
        "--short_side=160,200",
        "--font_size=12,18",
        "--seed=4",
    ]
    assert prep_main.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shards"] == 3 and report["records_out"] == 5
    recs = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["key"] for r in recs] == [f"{i:09d}" for i in range(5)]
    # Record 3 is page 3 of seed 4, as the library renders it.
    page = ocr_synth.synth_page(
        3,
        CORPUS,
        sorted(str(font_dir / f.rsplit("/", 1)[-1]) for f in fonts[:3]),
        seed=4,
        cfg=ocr_synth.SynthConfig(short_side=(160, 200), font_size=(12, 18)),
    )
    assert (out / recs[3]["image"]).read_bytes() == page.encoded()
    assert recs[3]["lines"] == page.record()["lines"]
    before = (out / "train.jsonl").read_bytes()
    assert prep_main.main(argv) == 0  # every shard done: nothing re-rendered, same output
    assert (out / "train.jsonl").read_bytes() == before
    bad = argv[:-1] + ["--font_size=18,12"]
    assert prep_main.main(bad) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for corpus_flag in (f"--input={empty}", f"--input={tmp_path / 'missing.txt'}"):
        assert prep_main.main([argv[0], corpus_flag, *argv[2:]]) == 2


def test_beam_direct_runner_writes_the_same_bytes(tmp_path):
    pytest.importorskip("apache_beam", reason="apache-beam is not installed (the prep extra)")
    from qwenvl_jax.prep import __main__ as prep_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    flags = ["--pages=3", "--pages_per_shard=2", "--short_side=160,200", "--font_size=12,18"]
    for runner in ("inprocess", "DirectRunner"):
        argv = ["synthdog", f"--input={corpus}", f"--output={tmp_path / runner}", *flags]
        assert prep_main.main([*argv, f"--runner={runner}"]) == 0

    def files(d):
        # The done markers name their input path and time; everything else must be equal.
        return {
            str(p.relative_to(d)): p.read_bytes()
            for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.endswith(".done.json") and "_synth" not in p.parts
        }

    a, b = files(tmp_path / "inprocess"), files(tmp_path / "DirectRunner")
    assert len(a) == 8 and a == b  # 2 shard files + 3 images + merged, report, mixture


NOTO_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"


@pytest.mark.skipif(
    not os.path.exists(NOTO_CJK), reason="needs Debian's fonts-noto-cjk (not installed on CI)"
)
def test_chinese_pages_with_a_debian_font():
    text = ["通义千问是阿里云研发的大规模语言模型，能够理解图像和文字，可以回答问题、创作文字。"]
    scores = []
    for i in range(5):
        page = ocr_synth.synth_page(i, text, [NOTO_CJK], cfg=SMALL)
        assert page.lines and all(
            "\u4e00" <= ln.text[0] <= "\u9fff" or ln.text[0] in "，、。" for ln in page.lines
        )
        for ln in page.lines:
            mask = ocr_synth.render_alone(ln.text, ln.font, ln.font_size)
            scores.append(_match(page.image, ln.quad, mask))
    assert np.median(scores) > 0.85
