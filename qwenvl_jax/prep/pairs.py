"""A.1 image-text pairs: the paper's eight cleaning steps, the academic datasets' special tags and
the longest text per image, as named steps configured by `configs/data/prep_pairs.json`.

  python -m qwenvl_jax.prep pairs --input='laion/*.tar' --output=out/laion_en --dataset=laion_en
      [--config=configs/data/prep_pairs.json] [--runner=DirectRunner]

Input: img2dataset shards (webdataset `.tar` or `.parquet` with the image bytes). Output: JSON lines
of `{"image", "caption", ...}` + images (the trainer's `caption` task), `report.json` (pairs removed
per step and reason) and `mixture.json`. Each step's meaning and threshold is written beside it in
the config file; `--dataset` picks the dataset-specific CLIP threshold and the special tags.
"""

from __future__ import annotations

import functools
import hashlib
import html.parser
import json
import os
import re
from collections.abc import Iterator, Mapping

import regex

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError, MissingPathError
from qwenvl_jax.prep import runner
from qwenvl_jax.prep.shards import image_size
from qwenvl_jax.prep.steps import Context, Drop, Step

HELP = "A.1: clean web image-text pairs (img2dataset .tar / .parquet shards)"
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "configs", "data", "prep_pairs.json"
)


def load_config(path: str | None = None) -> dict:
    """The A.1 config (default: the shipped `configs/data/prep_pairs.json`)."""
    path = path or DEFAULT_CONFIG
    try:
        cfg = json.loads(fileio.read_text(path))
    except FileNotFoundError:
        raise MissingPathError(f"--config={path}: file not found") from None
    except ValueError as e:
        raise ConfigError(f"--config={path} is not JSON: {e}") from None
    unknown = [s for s in cfg.get("order", []) if s not in STEPS]
    if unknown or "order" not in cfg:
        raise ConfigError(f"{path}: 'order' must list steps among {sorted(STEPS)}; bad: {unknown}")
    return cfg


def _text(rec: dict, field: str) -> str:
    t = rec.get(field)
    if isinstance(t, bytes):
        t = t.decode("utf-8", errors="replace")
    if not isinstance(t, str):
        raise Drop("no_text")
    return t


# ------------------------------------------------------------------------------ image steps
def check_image(rec: dict, ctx: Context) -> Iterator[dict]:
    """The record has image bytes whose header decodes (else `no_image` / `image_corrupt`)."""
    if not isinstance(rec.get("image"), (bytes, bytearray)) or not rec["image"]:
        raise Drop("no_image")
    try:
        image_size(rec)
    except Exception:  # noqa: BLE001 - any decoder error means an unusable image
        raise Drop("image_corrupt") from None
    yield rec


def aspect_ratio(rec: dict, ctx: Context, *, max: float) -> Iterator[dict]:  # noqa: A002
    """A.1 step 1: drop when longer side / shorter side > `max`."""
    w, h = image_size(rec)
    if max_side_ratio(w, h) > max:
        raise Drop("aspect_ratio")
    yield rec


def max_side_ratio(w: int, h: int) -> float:
    return max(w, h) / min(w, h) if min(w, h) > 0 else float("inf")


def min_size(rec: dict, ctx: Context, *, min_side: int) -> Iterator[dict]:
    """A.1 step 2: drop when the shorter side < `min_side` pixels."""
    if min(image_size(rec)) < min_side:
        raise Drop("too_small")
    yield rec


# ------------------------------------------------------------------------------- text steps
def special_tags(
    rec: dict, ctx: Context, *, field: str, patterns: tuple[str, ...]
) -> Iterator[dict]:
    """CC12M / SBU: drop text holding one of the dataset's placeholder tags."""
    text = _text(rec, field)
    if any(re.search(p, text) for p in patterns):
        raise Drop("special_tag")
    yield rec


class _TextOnly(html.parser.HTMLParser):
    """Collects the text of an HTML fragment (script/style bodies left out, entities decoded)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "li"):
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


_WS = re.compile(r"\s+")
# Only '<' and a letter, '/' or '!' starts a tag; "a < b" is text, as a browser reads it.
_LOOKS_HTML = re.compile(r"<[A-Za-z/!]|&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z]+);")


def strip_html(text: str) -> str:
    """The text of an HTML fragment with white space collapsed (stdlib `html.parser`)."""
    p = _TextOnly()
    p.feed(text)
    p.close()
    return _WS.sub(" ", "".join(p.parts)).strip()


def clean_html(rec: dict, ctx: Context, *, field: str) -> Iterator[dict]:
    """A.1 step 7: the HTML-tagged parts removed; `modified` counts the changed texts."""
    text = _text(rec, field)
    if _LOOKS_HTML.search(text):
        clean = strip_html(text)
        if clean != text:
            ctx.count("modified")
            if not clean:
                raise Drop("empty_after_html")
            rec[field] = clean
    yield rec


def clean_irregular(
    rec: dict, ctx: Context, *, field: str, patterns: tuple[tuple[str, str], ...]
) -> Iterator[dict]:
    """A.1 step 8: the configured irregular patterns removed (counted per pattern name)."""
    text = _text(rec, field)
    for name, pat in patterns:
        text, n = re.subn(pat, " ", text)
        if n:
            ctx.count(name, n)
    text = _WS.sub(" ", text).strip()
    if text != rec[field]:
        ctx.count("modified")
        if not text:
            raise Drop("empty_after_patterns")
        rec[field] = text
    yield rec


# Letters, marks and digits that are not ASCII, not the Han script, not full-width Latin or digits.
# Variation selectors and the keycap mark are marks too, but they belong to emoji (next step).
_NOT_EN_ZH = (
    r"[[\p{L}\p{M}\p{N}]--[A-Za-z0-9\p{Han}\uFF10-\uFF19\uFF21-\uFF3A\uFF41-\uFF5A"
    r"\uFE00-\uFE0F\u20E3%s]]"
)


@functools.lru_cache(maxsize=8)
def _not_en_zh(extra: str):
    return regex.compile("(?V1)" + _NOT_EN_ZH % regex.escape(extra, special_only=False))


def language(rec: dict, ctx: Context, *, field: str, extra_allowed: str = "") -> Iterator[dict]:
    """A.1 step 4: drop text with letters/digits outside English and Chinese."""
    if _not_en_zh(extra_allowed).search(_text(rec, field)):
        raise Drop("not_english_or_chinese")
    yield rec


@functools.lru_cache(maxsize=8)
def _emoji(allowed: str):
    allow = regex.escape(allowed, special_only=False) if allowed else r"\x00"
    return regex.compile(r"(?V1)[[\p{Extended_Pictographic}\p{Regional_Indicator}]--[%s]]" % allow)


def no_emoji(rec: dict, ctx: Context, *, field: str, allowed_symbols: str = "") -> Iterator[dict]:
    """A.1 step 5: drop text holding an emoji character."""
    if _emoji(allowed_symbols).search(_text(rec, field)):
        raise Drop("emoji")
    yield rec


def text_length(
    rec: dict, ctx: Context, *, field: str, min_chars: int, max_chars: int
) -> Iterator[dict]:
    """A.1 step 6: drop text of fewer than `min_chars` or more than `max_chars` characters."""
    n = len(_text(rec, field).strip())
    if n < min_chars:
        raise Drop("too_short")
    if n > max_chars:
        raise Drop("too_long")
    yield rec


# ------------------------------------------------------------------------------ group / out
def longest_text(records: list[dict], ctx: Context, *, field: str) -> list[dict]:
    """A.1: of the records sharing one image (same bytes), the one with the longest text."""
    best: dict[bytes, int] = {}
    for i, rec in enumerate(records):
        h = hashlib.sha1(rec["image"]).digest()
        j = best.get(h)
        if j is None or len(rec[field]) > len(records[j][field]):
            best[h] = i
    keep = sorted(best.values())
    return [records[i] for i in keep]


def select_fields(rec: dict, ctx: Context, *, fields: tuple[str, ...]) -> Iterator[dict]:
    """Keeps the image and the configured fields; `width` / `height` are the image's own."""
    if "_size" in rec:
        rec["width"], rec["height"] = rec["_size"]
    yield {k: rec[k] for k in ("image", "image_ext", *fields) if k in rec}


STEPS = (
    "image",
    "aspect_ratio",
    "min_size",
    "clip_score",
    "special_tags",
    "language",
    "emoji",
    "text_length",
    "html",
    "irregular",
    "longest_text",
    "output",
)


def build_steps(cfg: Mapping, dataset: str, scorer=None) -> list[Step]:
    """The configured steps for `dataset`, in `cfg["order"]`.

    Args:
      cfg: the A.1 config (`load_config`).
      dataset: the dataset's name (its CLIP threshold and special tags).
      scorer: a `clip_score.Scorer` for records without a score (default: open_clip with the
        config's model, built on first use).

    Steps whose setting does not apply to `dataset` (no CLIP threshold, no special tags) are left
    out of the list.
    """
    f = cfg.get("text_field", "caption")
    out: list[Step] = []
    P = functools.partial
    for name in cfg["order"]:
        c = cfg.get(name, {})
        if name == "image":
            out.append(Step(name, check_image))
        elif name == "aspect_ratio":
            out.append(Step(name, P(aspect_ratio, max=float(c["max"]))))
        elif name == "min_size":
            out.append(Step(name, P(min_size, min_side=int(c["min_side"]))))
        elif name == "special_tags":
            pats = tuple(c.get("patterns", {}).get(dataset, ()))
            if pats:
                out.append(Step(name, P(special_tags, field=f, patterns=pats)))
        elif name == "html":
            out.append(Step(name, P(clean_html, field=f)))
        elif name == "irregular":
            pats = tuple((k, v) for k, v in c.get("patterns", {}).items())
            out.append(Step(name, P(clean_irregular, field=f, patterns=pats)))
        elif name == "language":
            out.append(Step(name, P(language, field=f, extra_allowed=c.get("extra_allowed", ""))))
        elif name == "emoji":
            allowed = c.get("allowed_symbols", "")
            out.append(Step(name, P(no_emoji, field=f, allowed_symbols=allowed)))
        elif name == "text_length":
            kw = dict(min_chars=int(c["min_chars"]), max_chars=int(c["max_chars"]))
            out.append(Step(name, P(text_length, field=f, **kw)))
        elif name == "clip_score":
            threshold = c.get("thresholds", {}).get(dataset)
            if threshold is not None:
                from qwenvl_jax.prep import clip_score

                sc = scorer or clip_score.OpenClipScorer(c["model"], c["pretrained"])
                fn = clip_score.ClipFilter(
                    scorer=sc,
                    threshold=float(threshold),
                    text_field=f,
                    score_field=c.get("score_field", "clip_score"),
                )
                out.append(Step(name, fn, batch_size=int(c.get("batch_size", 32))))
        elif name == "longest_text":
            out.append(
                Step(name, P(longest_text, field=f), whole_shard=True, drop_reason="shorter_text")
            )
        elif name == "output":
            out.append(Step(name, P(select_fields, fields=tuple(c.get("fields", (f,))))))
    return out


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (laion_en, coyo, cc12m, ...)")
    p.add_argument("--config", default=None, help="A.1 config (default: prep_pairs.json)")
    p.add_argument("--name", default="train", help="the merged output's name (NAME.jsonl)")


def run(args, pipeline_args) -> dict:
    cfg = load_config(args.config)
    steps = build_steps(cfg, args.dataset)
    return runner.run(
        steps,
        args.input,
        args.output,
        seed=args.seed,
        runner=args.runner,
        pipeline_args=pipeline_args,
        output_name=args.name,
        mixture={args.name: {"task": "caption"}},
    )
