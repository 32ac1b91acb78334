"""The demo's SentencePiece vocabulary: training options the tokenizer relies on, and reuse."""

import os

import pytest

from qwenvl_jax import tokenizer as tk
from qwenvl_jax.demo import vocab


def test_trained_vocabulary_has_what_the_tokenizer_needs(tmp_path):
    sp = vocab.train_sentencepiece(
        ["a red square", "two  spaces\tand 1234"] * 5, str(tmp_path / "m"), 300
    )
    assert isinstance(sp, tk.SentencePieceQWenTokenizer)
    assert os.path.isfile(tmp_path / "m.model")
    # Byte fallback: text never seen in training encodes and decodes back, whitespace verbatim.
    for text in ["ünseen ✓ 图", "two  spaces\tand 1234", " leading"]:
        assert sp.decode(sp.encode(text)) == text
    # Digits are split one by one (as the Qwen regex does).
    assert [sp.decode([i]) for i in sp.encode("1234")] == ["1", "2", "3", "4"]
    with pytest.raises(ValueError, match="at least one non-empty text"):
        vocab.train_sentencepiece(["", ""], str(tmp_path / "empty"), 300)


def test_build_tokenizer_trains_once(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red square\n\nthe blue circle\n" * 20)
    out = str(tmp_path / "tokenizer")
    tok = vocab.build_tokenizer(str(corpus), out, 300, image_span=16)
    model = os.path.join(out, tk.SP_MODEL_NAME)
    assert tok.image_span == 16 and tok.model_file == model
    stamp = os.stat(model).st_mtime_ns
    corpus.write_text("something else entirely\n")
    again = vocab.build_tokenizer(str(corpus), out, 300, image_span=8)
    # The existing model is loaded, not retrained on the new corpus.
    assert os.stat(model).st_mtime_ns == stamp
    assert again.image_span == 8 and again.encode("the blue circle") == tok.encode(
        "the blue circle"
    )
