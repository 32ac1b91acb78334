"""Tokenizer tests: ids against fixtures made by the published tokenizer, image spans, errors.

The chat format built on it (make_context, decode_chatml, from_list_format) is tested in
test_chat.py."""

import hashlib
import json
import os
import unicodedata

import numpy as np
import pytest

from qwenvl_jax import tokenizer as tk
from qwenvl_jax.demo.vocab import train_sentencepiece

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")


# ---------------------------------------------------------------------- facts from the spec (§5)
def test_special_ids_and_sizes(tok):
    assert len(tok) == tok.n_vocab == 151860
    assert tok.eod_id == tok.pad_id == 151643
    assert (tok.im_start_id, tok.im_end_id) == (151644, 151645)
    assert tok.special_tokens["<|extra_0|>"] == 151646
    assert tok.special_tokens["<|extra_204|>"] == 151850
    assert (tok.ref_start_id, tok.ref_end_id, tok.box_start_id, tok.box_end_id) == (
        151851,
        151852,
        151853,
        151854,
    )
    assert (tok.quad_start_id, tok.quad_end_id) == (151855, 151856)
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (151857, 151858, 151859)
    assert len(tok.special_tokens) == 217


def test_spec_examples(tok):
    assert tok.encode("\n") == [198]
    assert tok.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    assert tok.encode("Picture 1: ") == [24669, 220, 16, 25, 220]
    ids = tok.encode("Picture 1: <img>demo.jpeg</img>\nWhat is this?")
    span = [151857, 100, 101, 109, 111, 46, 106, 112, 101, 103] + [151859] * 247 + [151858]
    assert ids == [24669, 220, 16, 25, 220] + span + [198, 3838, 374, 419, 30]
    assert tok.decode(ids) == "Picture 1: <img>demo.jpeg</img>\nWhat is this?"
    assert tok.image_paths(ids) == ["demo.jpeg"]
    assert tok.image_spans(ids) == [(5, 262)]


# ---------------------------------------------------------------------- bad input
def test_unclosed_image_is_an_error(tok):
    with pytest.raises(ValueError, match="Unclosed image token"):
        tok.encode("look <img>a.jpg and more")


def test_long_image_path_is_an_error_naming_it(tok):
    path = "/data/" + "x" * 250 + ".jpg"  # 260 bytes
    with pytest.raises(ValueError, match=r"260 UTF-8 bytes.*xxxx\.jpg"):
        tok.encode(f"<img>{path}</img>")
    ok = "a" * 255
    ids = tok.encode(f"<img>{ok}</img>")
    assert len(ids) == 258 and ids[-2] == tok.img_pad_id
    with pytest.raises(ValueError, match="256 UTF-8 bytes"):
        tok.encode(f"<img>{'a' * 256}</img>")


def test_multibyte_path_counts_bytes(tok):
    path = "图" * 85  # 255 bytes
    ids = tok.encode(f"<img>{path}</img>")
    assert ids[1:256] == list(path.encode())
    assert tok.image_paths(ids) == [path]
    with pytest.raises(ValueError, match="258 UTF-8 bytes"):
        tok.encode(f"<img>{'图' * 86}</img>")


def test_decode_rejects_out_of_vocab_ids(tok):
    with pytest.raises(ValueError, match="151900"):
        tok.decode([1, 151900])


def test_bad_vocab_file(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\nIg== 1\n")
    with pytest.raises(ValueError, match="not the published Qwen vocabulary"):
        tk.QWenTokenizer(str(bad))
    with pytest.raises(FileNotFoundError, match="nothere"):
        tk.QWenTokenizer(str(tmp_path / "nothere.tiktoken"))


def test_crlf_vocab_file_is_accepted(tmp_path, tok):
    crlf = tmp_path / "qwen.tiktoken"
    with open(tk.default_vocab_file(), "rb") as f:
        crlf.write_bytes(f.read().replace(b"\n", b"\r\n"))
    t2 = tk.QWenTokenizer(str(crlf))
    assert t2.encode("你好 world 123") == tok.encode("你好 world 123")


def test_save_vocabulary_round_trip(tmp_path, tok):
    vocab, cfg = tok.save_vocabulary(str(tmp_path))
    with open(vocab, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tk.QWEN_TIKTOKEN_SHA256
    with open(cfg) as f:
        assert json.load(f) == {
            "model_max_length": 8192,
            "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        }
    assert isinstance(tk.load_tokenizer(str(tmp_path)), tk.QWenTokenizer)


# ---------------------------------------------------------------------- published-code fixtures
def _fixture(name):
    with open(os.path.join(FIXTURES, name), encoding="utf8") as f:
        return json.load(f)


def test_encode_matches_published_tokenizer(tok):
    data = _fixture("encode.json")
    assert len(data["cases"]) > 250
    for case in data["cases"]:
        got = tok.encode(case["text"], allowed_special=case["allowed_special"])
        assert got == case["ids"], (case["text"], case["allowed_special"])


def test_published_errors_are_errors_here(tok):
    for case in _fixture("encode.json")["errors"]:
        with pytest.raises(ValueError):
            tok.encode(case["text"])


def test_decode_matches_published_tokenizer(tok):
    for case in _fixture("decode.json"):
        got = tok.decode(
            case["ids"],
            skip_special_tokens=case["skip_special_tokens"],
            keep_image_special=case["keep_image_special"],
        )
        assert got == case["text"], case


def test_decode_inverts_encode(tok):
    for case in _fixture("encode.json")["cases"]:
        if case["allowed_special"] == "all":
            text = case["text"]
            assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------------- SentencePiece backend
@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    texts = [
        "What is in the picture? A dog on the grass.",
        "图中有一只猫。 The cat sleeps on a sofa 123.",
        "Describe <ref>the dog</ref> please.\nAnswer: a brown dog",
    ] * 10
    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    return train_sentencepiece(texts, prefix, vocab_size=320)


def test_sentencepiece_special_tokens(sp_tok):
    n = sp_tok.sp.get_piece_size()
    assert sp_tok.n_vocab == len(sp_tok) == n + 217
    assert sp_tok.eod_id == n and sp_tok.im_start_id == n + 1 and sp_tok.im_end_id == n + 2
    assert sp_tok.special_tokens["<|extra_204|>"] == n + 207
    assert (sp_tok.img_start_id, sp_tok.img_end_id, sp_tok.img_pad_id) == (
        n + 214,
        n + 215,
        n + 216,
    )
    assert sp_tok.ref_start_id == n + 208 and sp_tok.quad_end_id == n + 213
    assert sp_tok.encode("<|im_start|><box></box>") == [n + 1, n + 210, n + 211]


def test_sentencepiece_round_trip_and_image_span(sp_tok):
    texts = [
        "Hello  world\n\n x\ty",
        "ünïcödé ✓ 日本語 😀",
        " leading space",
        "Picture 1: <img>/tmp/图 a.jpg</img>\nWhat?<|im_end|>",
        "<ref>dog</ref><box>(1,2),(3,4)</box>",
    ]
    for text in texts:
        assert sp_tok.decode(sp_tok.encode(text)) == text
    path = "/tmp/图 a.jpg"
    ids = sp_tok.encode(f"x<img>{path}</img>y")
    ((a, b),) = sp_tok.image_spans(ids)
    assert b - a == 257
    inner = ids[a + 1 : b]
    byte_ids = [sp_tok.sp.piece_to_id(f"<0x{c:02X}>") for c in path.encode()]
    assert inner[: len(byte_ids)] == byte_ids
    assert len(set(byte_ids)) == len(set(path.encode()))
    assert inner[len(byte_ids) :] == [sp_tok.img_pad_id] * (256 - len(byte_ids))
    assert sp_tok.image_paths(ids) == [path]
    assert sp_tok.decode(ids, skip_special_tokens=True) == f"x{path}y"
    with pytest.raises(ValueError, match="Unclosed image token"):
        sp_tok.encode("<img>abc")
    with pytest.raises(ValueError, match="300 UTF-8 bytes"):
        sp_tok.encode("<img>" + "a" * 300 + "</img>")


def test_sentencepiece_allowed_special(sp_tok):
    ids = sp_tok.encode("<|im_start|>x<img>a</img>", allowed_special=set(tk.IMAGE_ST))
    assert sp_tok.im_start_id not in ids and sp_tok.img_start_id in ids
    with pytest.raises(ValueError, match="disallowed special token"):
        sp_tok.encode("<|endoftext|>", allowed_special=(), disallowed_special="all")


def test_sentencepiece_save_and_load(sp_tok, tmp_path):
    raw = "<|im_start|>user\nhi <img>a.png</img><|im_end|>\n<|im_start|>assistant\n"
    sp_tok.save_vocabulary(str(tmp_path))
    again = tk.load_tokenizer(str(tmp_path))
    assert isinstance(again, tk.SentencePieceQWenTokenizer)
    assert again.encode(raw) == sp_tok.encode(raw)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        tk.load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        tk.load_tokenizer(str(tmp_path / "nope"))


def test_short_image_span(sp_tok):
    # A tokenizer for a model with 36 adapter queries: spans of 36 inner positions.
    short = tk.SentencePieceQWenTokenizer(sp_tok.model_file, image_span=36)
    path = "images/heldout/000012.png"
    ids = short.encode(f"Picture 1: <img>{path}</img>\nhi")
    ((a, b),) = short.image_spans(ids)
    assert b - a == 37
    assert ids[a + 1 + len(path) : b] == [short.img_pad_id] * (36 - len(path))
    assert short.image_paths(ids) == [path]
    # The text around the span is what the 256-position tokenizer gives.
    long_ids = sp_tok.encode(f"Picture 1: <img>{path}</img>\nhi")
    assert ids[:a] == long_ids[:a] and ids[b + 1 :] == long_ids[a + 258 :]
    assert short.encode("<img>" + "x" * 35 + "</img>")[-2] == short.img_pad_id
    with pytest.raises(ValueError, match="36 UTF-8 bytes, more than 35 fit in an <img> span of 36"):
        short.encode("<img>" + "x" * 36 + "</img>")
    with pytest.raises(ValueError, match="image_span must be an int >= 2"):
        tk.SentencePieceQWenTokenizer(sp_tok.model_file, image_span=1)
    loaded = tk.load_tokenizer(sp_tok.model_file, image_span=36)
    assert loaded.encode(f"<img>{path}</img>") == short.encode(f"<img>{path}</img>")


# ------------------------------------------------------- the span rule (image_span_starts, index)
IMG = 151857  # <img> of the published vocabulary (test_special_ids_and_sizes)


def _span(n=256):
    return [IMG] + [IMG + 2] * n + [IMG + 1]


def test_image_token_index_numbering():
    row0 = [1, 2] + _span() + [3] + _span() + [4]
    row1 = [5] * 3 + _span() + [6] * (len(row0) - 261)
    idx, counts = tk.image_token_index(np.array([row0, row1]), IMG, 256)
    assert counts.tolist() == [2, 1]
    assert idx[0, :3].tolist() == [-1, -1, -1]
    assert idx[0, 3:259].tolist() == list(range(256))
    assert idx[0, 259:262].tolist() == [-1, -1, -1]
    assert idx[0, 262:518].tolist() == list(range(256, 512))
    assert idx[1, 4:260].tolist() == list(range(256))
    assert (idx[1, 260:] == -1).all() and (idx[1, :4] == -1).all()


@pytest.mark.parametrize(
    "row,reason,msg",
    [
        ([1, IMG] + [7] * 256, "unclosed_img", "1 <img> but 0 </img> tokens: .* never closed"),
        ([1, IMG + 1, 2], "stray_img_end", "^row 0: 0 <img> but 1 </img> tokens: .* no matching"),
        ([IMG] + [7] * 10 + [IMG + 1], "bad_image_tag", "258-token image span: .* holds 10 tokens"),
        (
            [IMG, IMG] + [7] * 255 + [IMG + 1],
            "bad_image_tag",
            "token 1 inside the image span opened at 0",
        ),
        # Nested spans whose </img> land 257 tokens after each <img>: equal tag counts and the
        # right distance, still no well-formed span (the packer's old check let this through).
        ([IMG, IMG] + [7] * 255 + [IMG + 1] * 2, "bad_image_tag", "inside the image span"),
    ],
)
def test_image_span_errors(row, reason, msg):
    with pytest.raises(tk.ImageSpanError, match=msg) as e:
        tk.image_token_index(np.array([row]), IMG, 256)
    assert e.value.reason == reason
    with pytest.raises(tk.ImageSpanError, match=msg.replace("^row 0: ", "^")):
        tk.image_span_starts(row, IMG, IMG + 1, 256)


def test_image_span_starts_short_spans():
    row = [0] + _span(4) + [0, 0] + _span(4)
    assert tk.image_span_starts(row, IMG, IMG + 1, 4) == [1, 9]
    assert tk.image_span_starts(np.asarray(row), IMG, IMG + 1, 4) == [1, 9]
    assert tk.image_span_starts([1, 2, 3], IMG, IMG + 1, 4) == []
