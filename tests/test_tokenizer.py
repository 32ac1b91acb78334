"""Tokenizer tests: ids against fixtures made by the published tokenizer, image spans, errors."""

import hashlib
import json
import os

import pytest

from qwenvl_jax import tokenizer as tk

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")


@pytest.fixture(scope="module")
def tok():
    return tk.QWenTokenizer()


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


def test_single_turn_context_layout(tok):
    raw, ids = tk.make_context(tok, "Hi")
    q = tok.encode("Hi")
    head = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    assert ids == head + q + [151645, 198, 151644, 77091, 198]
    assert raw == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(ids) == raw


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
