"""Synthetic OCR pages the SynthDoG way (Appendix A.4), with every text line's quadrilateral.

SynthDoG (Kim et al., 2022) renders a paper sheet with text in a grid of text boxes, warps it
onto a natural-scene background (the paper used COCO train2017 + unlabeled2017) and degrades the
result; Qwen-VL tracked the text locations and trained on them as `<quad>`s. This module renders
the same kind of page with Pillow and carries the homography of the sheet through to the corners
of every rendered line, so each quad is where the line's ink is.

Written with Pillow, not the `synthdog`/`synthtiger` packages: synthtiger imports `imgaug`,
which fails on NumPy 2 (`np.sctypes` was removed), and the PyPI `synthdog` pins Pillow 9.4;
both conflict with the pinned set.

Everything random comes from `numpy.random.default_rng((seed, index))`, so page `index` of a
seed is the same on every machine and in every shard split.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from qwenvl_jax.errors import ConfigError, MissingPathError
from qwenvl_jax.prep.ocr_page import OcrPage, TextLine

# Characters written without spaces between them (CJK ideographs, kana, hangul, full-width forms).
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef"
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_CJK_RE = re.compile(f"[{_CJK}]")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """How synthetic pages look; the defaults follow SynthDoG's English config where it has one.

    Attributes:
      short_side: range of the output image's short side in pixels.
      aspect: range of long side / short side; the page is landscape with probability 1/2.
      paper_fill: range of the fraction of each image side the paper sheet spans.
      font_size: range of the text size in pixels on the sheet.
      columns: range of text columns on the sheet.
      words_per_line: range of words per line before wrapping (two CJK characters count as one).
      text_gray: range of the text's gray level (dark text on a light sheet, as SynthDoG).
      paper_gray: range of the sheet's base gray level.
      perspective: the sheet's corners move inward by up to this fraction of its size.
      rotate: the sheet is rotated by up to this many degrees either way.
      blur: range of the Gaussian blur radius of the finished page.
      noise: range of the standard deviation of the added pixel noise.
      jpeg_quality: range of the JPEG quality the page is stored with.
    """

    short_side: tuple[int, int] = (720, 1024)
    aspect: tuple[float, float] = (1.0, 2.0)
    paper_fill: tuple[float, float] = (0.6, 0.95)
    font_size: tuple[int, int] = (16, 36)
    columns: tuple[int, int] = (1, 2)
    words_per_line: tuple[int, int] = (2, 8)
    text_gray: tuple[int, int] = (0, 64)
    paper_gray: tuple[int, int] = (200, 255)
    perspective: float = 0.08
    rotate: float = 8.0
    blur: tuple[float, float] = (0.0, 0.8)
    noise: tuple[float, float] = (0.0, 6.0)
    jpeg_quality: tuple[int, int] = (50, 95)


def matplotlib_fonts() -> list[str]:
    """The DejaVu fonts matplotlib ships (a pip-only environment's fonts); [] without it."""
    try:
        import matplotlib
    except ImportError:
        return []

    ttf = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    return sorted(glob.glob(os.path.join(ttf, "DejaVu*.ttf")))


def find_fonts(patterns: Sequence[str]) -> list[str]:
    """Font files (.ttf/.otf/.ttc) matching globs or under directories, sorted.

    Raises:
      MissingPathError: nothing matched (names the patterns).
    """
    return _find_files(patterns, (".ttf", ".otf", ".ttc"), "--fonts", "font")


def _find_files(patterns: Sequence[str], suffixes: tuple[str, ...], flag: str, what: str):
    """Files ending in `suffixes` that match globs or lie under directories, sorted; a
    MissingPathError naming `flag` when none does."""
    out = set()
    for p in patterns:
        if os.path.isdir(p):
            p = os.path.join(p, "**", "*")
        out.update(
            f
            for f in glob.glob(p, recursive=True)
            if f.lower().endswith(suffixes) and os.path.isfile(f)
        )
    if not out:
        kinds = "/".join(suffixes)
        raise MissingPathError(f"{flag}: no {kinds} {what} matches {list(patterns)}")
    return sorted(out)


@functools.lru_cache(maxsize=64)
def _cmap(path: str) -> frozenset[int]:
    """The code points a font has glyphs for (its first face for a collection)."""
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=0, lazy=True) as f:
        return frozenset(f.getBestCmap() or {})


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size=size, index=0)


def render_alone(text: str, font: str, size: int) -> np.ndarray:
    """The ink mask (bool [h, w]) of `text` drawn alone with `font` at `size`, cropped to the same
    box the generator tracks for a line (the font's bounding box of the string)."""
    f = _font(font, size)
    left, top, right, bottom = f.getbbox(text, anchor="ls")
    img = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(img).text((-left, -top), text, font=f, fill=255, anchor="ls")
    return np.asarray(img) > 127


def _natural_background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A scene-like background without a photo: multi-scale colour noise (sky, ground, texture)
    with a few blurred blobs as objects, made at quarter size (it is smooth) and upsampled. Use
    real photos (COCO, as the paper) via `backgrounds` for training data."""
    sw, sh = max(8, w // 4), max(8, h // 4)
    acc = np.zeros((sh, sw, 3), np.float32)
    for k, cells in enumerate((2, 4, 8, 32)):
        small = rng.uniform(0, 255, (cells, max(2, cells * w // h), 3)).astype(np.uint8)
        acc += np.asarray(Image.fromarray(small).resize((sw, sh), Image.BICUBIC), np.float32) * (
            0.5**k
        )
    acc /= sum(0.5**k for k in range(4))
    img = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.uniform(0, sw), rng.uniform(0, sh)
        rx, ry = rng.uniform(0.05, 0.3) * sw, rng.uniform(0.05, 0.3) * sh
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=tuple(rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(radius=max(sw, sh) / 200))
    return img.resize((w, h), Image.BILINEAR)


def _background(rng: np.random.Generator, w: int, h: int, paths: Sequence[str]) -> Image.Image:
    if not paths:
        return _natural_background(rng, w, h)
    path = paths[int(rng.integers(len(paths)))]
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise MissingPathError(f"--backgrounds: cannot read image {path}: {e}") from None
    # Cover the canvas (scale so both sides reach it), then take a random crop.
    s = max(w / img.width, h / img.height)
    img = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.BILINEAR)
    x0 = int(rng.integers(img.width - w + 1))
    y0 = int(rng.integers(img.height - h + 1))
    return img.crop((x0, y0, x0 + w, y0 + h))


def _paper(rng: np.random.Generator, w: int, h: int, cfg: SynthConfig) -> Image.Image:
    base = rng.integers(cfg.paper_gray[0], cfg.paper_gray[1] + 1) - rng.integers(0, 12, 3)
    # Paper grain: low-resolution noise, upsampled so it is smooth like a texture.
    grain = rng.normal(0, 4, (max(2, h // 8), max(2, w // 8))).astype(np.float32)
    grain = np.asarray(Image.fromarray(grain, "F").resize((w, h), Image.BILINEAR))
    arr = np.clip(base[None, None, :] + grain[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


class Corpus:
    """Text to draw lines from, split once into words (CJK text into characters).

    Raises:
      ConfigError: the texts hold no word.
    """

    def __init__(self, texts: Sequence[str]):
        self.tokens = [t for text in texts for t in _TOKEN_RE.findall(text)]
        if not self.tokens:
            raise ConfigError("the text corpus holds no words")


def _join(tokens: Sequence[str]) -> str:
    out = ""
    for t in tokens:
        if out and not (_CJK_RE.fullmatch(t) or _CJK_RE.fullmatch(out[-1])):
            out += " "
        out += t
    return out


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking the 4 points `src` to `dst` (the standard 8x8 solve)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    m = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return np.append(m, 1.0).reshape(3, 3)


def _apply(hmat: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ hmat.T
    return p[:, :2] / p[:, 2:3]


def _sheet_corners(rng, w: int, h: int, pw: int, ph: int, cfg: SynthConfig) -> np.ndarray:
    """Where the sheet's corners land on the page: jittered inward, rotated, then scaled and moved
    so that all four lie inside the image."""
    jitter = rng.uniform(0, cfg.perspective, (4, 2)) * np.array([pw, ph])
    corners = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float64)
    corners += jitter * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    t = np.deg2rad(rng.uniform(-cfg.rotate, cfg.rotate))
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    corners = (corners - corners.mean(0)) @ rot.T
    span = corners.max(0) - corners.min(0)
    scale = min(1.0, (w - 2) / span[0], (h - 2) / span[1])
    corners *= scale
    lo, hi = -corners.min(0), np.array([w - 1, h - 1]) - corners.max(0)
    return corners + rng.uniform(lo, np.maximum(lo, hi))


def _layout(rng, draw, pw: int, ph: int, cfg: SynthConfig, fonts, tokens, pos: int):
    """Fill the sheet with columns of lines; returns the lines (text, font, size, box) and the
    next corpus position. Lines wrap at the column width or at `words_per_line` tokens."""
    lines = []
    ncol = int(rng.integers(cfg.columns[0], cfg.columns[1] + 1))
    margin = rng.uniform(0.03, 0.1) * min(pw, ph)
    gutter = margin / 2
    colw = (pw - 2 * margin - (ncol - 1) * gutter) / ncol
    fill = int(rng.integers(cfg.text_gray[0], cfg.text_gray[1] + 1))
    for c in range(ncol):
        x0 = margin + c * (colw + gutter)
        y = margin
        while True:
            font_path = fonts[int(rng.integers(len(fonts)))]
            size = int(rng.integers(cfg.font_size[0], cfg.font_size[1] + 1))
            try:
                font = _font(font_path, size)
            except OSError as e:
                raise ConfigError(
                    f"--fonts: cannot draw with {font_path} at {size} px: {e}"
                ) from None
            ascent, descent = font.getmetrics()
            if y + ascent + descent > ph - margin:
                break
            have = _cmap(font_path)
            want = int(rng.integers(cfg.words_per_line[0], cfg.words_per_line[1] + 1))
            line: list[str] = []
            tries, used = 0, 0.0
            # A font without the corpus's script would otherwise scan the whole corpus.
            while used < want and tries < min(len(tokens), 1000):
                tries += 1
                tok = tokens[pos % len(tokens)]
                pos += 1
                if not all(ord(ch) in have for ch in tok):
                    continue  # this font has no glyph for it: skip, never draw a tofu box
                if line and draw.textlength(_join(line + [tok]), font=font) > colw:
                    pos -= 1
                    break
                if not line and draw.textlength(tok, font=font) > colw:
                    continue
                line.append(tok)
                used += 0.5 if _CJK_RE.fullmatch(tok) else 1.0  # a Chinese word: ~2 characters
            text = _join(line)
            base = (x0, y + ascent)
            if text.strip():
                left, top, right, bottom = draw.textbbox(base, text, font=font, anchor="ls")
                draw.text(base, text, font=font, fill=(fill,) * 3, anchor="ls")
                lines.append((text, font_path, size, (left, top, right, bottom)))
            y += (ascent + descent) * rng.uniform(1.1, 1.8)
    return lines, pos


def synth_page(
    index: int,
    corpus: Corpus | Sequence[str],
    fonts: Sequence[str],
    *,
    seed: int = 0,
    backgrounds: Sequence[str] = (),
    cfg: SynthConfig = SynthConfig(),
) -> OcrPage:
    """Render synthetic page `index` of `seed`.

    Args:
      index: the page number; page (seed, index) is always the same page.
      corpus: texts to draw from (paragraphs), or a `Corpus` of them (split once: pass one
        when rendering many pages from a large corpus).
      fonts: font files; each line picks one, and skips words it has no glyph for.
      seed: the run's seed.
      backgrounds: photo files for the scene (COCO in the paper); empty: procedural scenes.
      cfg: the page's look.

    Returns:
      the page, its lines with quads in the page's pixels, stored as JPEG at a random quality.

    Raises:
      ConfigError: an empty corpus or no fonts.
    """
    tokens = (corpus if isinstance(corpus, Corpus) else Corpus(corpus)).tokens
    if not fonts:
        raise ConfigError("--fonts: no font files given")
    rng = np.random.default_rng((seed, index))
    short = int(rng.integers(cfg.short_side[0], cfg.short_side[1] + 1))
    long = int(short * rng.uniform(*cfg.aspect))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    image = _background(rng, w, h, backgrounds)
    pw = int(w * rng.uniform(*cfg.paper_fill))
    ph = int(h * rng.uniform(*cfg.paper_fill))
    paper = _paper(rng, pw, ph, cfg)
    draw = ImageDraw.Draw(paper)
    pos = int(rng.integers(len(tokens)))
    lines, _ = _layout(rng, draw, pw, ph, cfg, list(fonts), tokens, pos)

    src = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float64)
    dst = _sheet_corners(rng, w, h, pw, ph, cfg)
    fwd = _homography(src, dst)
    inv = np.linalg.inv(fwd)
    inv /= inv[2, 2]
    coeffs = tuple(inv.flatten()[:8])
    warped = paper.transform((w, h), Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    mask = Image.new("L", (pw, ph), 255).transform(
        (w, h), Image.PERSPECTIVE, coeffs, Image.BILINEAR
    )
    image.paste(warped, (0, 0), mask)

    blur = rng.uniform(*cfg.blur)
    if blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius=blur))
    sigma = rng.uniform(*cfg.noise)
    arr = np.asarray(image, np.float32) + rng.normal(0, sigma, (h, w, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    out = []
    for text, font, size, (x0, y0, x1, y1) in lines:
        q = _apply(fwd, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64))
        out.append(TextLine(text, tuple(float(v) for v in q.flatten()), font, size))
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    return OcrPage(image, out, key=f"synth-{seed}-{index:08d}", quality=quality)


# ----------------------------------------------------------------------------------- command
HELP = "A.4: synthetic OCR pages the SynthDoG way (text on scene photos, every line's quad)"
_SPEC_DIR = "_synth"


def _pair(flag: str, value: str, kind=int) -> tuple:
    try:
        lo, hi = (kind(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(f"--{flag}={value}: expected two numbers LOW,HIGH") from None
    if not 0 < lo <= hi:
        raise ConfigError(f"--{flag}={value}: expected 0 < LOW <= HIGH")
    return lo, hi


@functools.lru_cache(maxsize=4)
def load_corpus(paths: tuple[str, ...]) -> Corpus:
    """The paragraphs (non-empty lines) of the corpus text files, read and split once per worker.

    Raises:
      MissingPathError: a file is missing. ConfigError: they hold no words.
    """
    from qwenvl_jax import fileio

    texts = []
    for p in paths:
        try:
            texts += [ln for ln in fileio.read_text(p).splitlines() if ln.strip()]
        except FileNotFoundError:
            raise MissingPathError(f"--input: corpus file not found: {p}") from None
    try:
        return Corpus(texts)
    except ConfigError:
        raise ConfigError(f"--input: the corpus {list(paths)} holds no words") from None


def read_spec(path: str):
    """The page indices a shard spec (`{"start": i, "count": n}`) names, as records."""
    import json

    from qwenvl_jax import fileio

    spec = json.loads(fileio.read_text(path))
    for i in range(spec["start"], spec["start"] + spec["count"]):
        yield {"key": f"{i:09d}", "_index": i}


def render_step(record: dict, ctx, *, corpus, fonts, backgrounds, cfg):
    """The prep step: a page index -> that page's `ocr` record (seeded by the run's seed)."""
    from qwenvl_jax.prep.steps import Drop

    page = synth_page(
        record["_index"],
        load_corpus(corpus),
        fonts,
        seed=ctx.seed,
        backgrounds=backgrounds,
        cfg=cfg,
    )
    if not page.lines:
        raise Drop("no_text")
    rec = page.record()
    rec["key"] = record["key"]
    yield rec


def _writes_letters(path: str) -> bool:
    """Whether a font scales (colour-bitmap emoji fonts do not) and has Latin or CJK letters
    (symbol and emoji fonts map only digits and signs), so a system-wide default is safe."""
    try:
        _font(path, 20)
        have = _cmap(path)
    except Exception:  # noqa: BLE001 - any font FreeType or fontTools cannot read is left out
        return False
    return all(ord(c) in have for c in "aeoz") or all(ord(c) in have for c in "的一是")


def default_fonts() -> list[str]:
    """Debian's fonts (`/usr/share/fonts`, e.g. fonts-dejavu, fonts-noto-cjk) where installed,
    else the DejaVu fonts matplotlib ships."""
    try:
        fonts = [f for f in find_fonts(["/usr/share/fonts"]) if _writes_letters(f)]
    except MissingPathError:
        fonts = []
    fonts = fonts or matplotlib_fonts()
    if not fonts:
        raise MissingPathError("no fonts in /usr/share/fonts nor matplotlib's; pass --fonts")
    return fonts


def add_arguments(p) -> None:
    d = SynthConfig()
    p.add_argument("--pages", type=int, required=True, help="how many pages to generate")
    p.add_argument("--pages_per_shard", type=int, default=1000, help="pages per output shard")
    p.add_argument(
        "--fonts",
        action="append",
        help="font files, globs or directories (repeatable; default: /usr/share/fonts, else"
        " matplotlib's DejaVu); the paper used 41 English and 11 Chinese fonts",
    )
    p.add_argument(
        "--backgrounds",
        action="append",
        help="scene photos: files, globs or directories (COCO train2017 + unlabeled2017 in the"
        " paper); default: procedural scenes",
    )
    p.add_argument("--short_side", default="%d,%d" % d.short_side, help="page short side LOW,HIGH")
    p.add_argument("--font_size", default="%d,%d" % d.font_size, help="text size LOW,HIGH (px)")


def _images(patterns: Sequence[str]) -> list[str]:
    return _find_files(patterns, (".jpg", ".jpeg", ".png", ".webp"), "--backgrounds", "image")


def run(args, pipeline_args) -> dict:
    """Writes one shard spec per `--pages_per_shard` pages under OUT/_synth, then renders them."""
    import json

    from qwenvl_jax import fileio
    from qwenvl_jax.prep import runner
    from qwenvl_jax.prep.steps import Step

    if args.pages <= 0 or args.pages_per_shard <= 0:
        raise ConfigError("--pages and --pages_per_shard must be > 0")
    corpus = tuple(args.input)
    load_corpus(corpus)  # a missing or empty corpus fails now, in one line
    fonts = find_fonts(args.fonts) if args.fonts else default_fonts()
    backgrounds = _images(args.backgrounds) if args.backgrounds else []
    cfg = dataclasses.replace(
        SynthConfig(),
        short_side=_pair("short_side", args.short_side),
        font_size=_pair("font_size", args.font_size),
    )
    spec_dir = fileio.join(args.output, _SPEC_DIR)
    fileio.makedirs(spec_dir)
    specs = []
    for n, start in enumerate(range(0, args.pages, args.pages_per_shard)):
        path = fileio.join(spec_dir, f"synth-{n:05d}.json")
        count = min(args.pages_per_shard, args.pages - start)
        fileio.write_text(path, json.dumps({"start": start, "count": count}))
        specs.append(path)
    step = functools.partial(
        render_step, corpus=corpus, fonts=tuple(fonts), backgrounds=tuple(backgrounds), cfg=cfg
    )
    return runner.run(
        [Step("render", step)],
        specs,
        args.output,
        seed=args.seed,
        runner=args.runner,
        pipeline_args=pipeline_args,
        reader=read_spec,
        mixture={"train": {"task": "ocr", "box_format": "xyxy_pixel"}},
    )
