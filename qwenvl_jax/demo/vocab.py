"""The demo's vocabulary: a small SentencePiece model trained on the synthetic world's text.

The library loads such a model (`qwenvl_jax.tokenizer.SentencePieceQWenTokenizer`, with Qwen-VL's
217 special tokens after its pieces); training one is the demo's job, done here.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable

from qwenvl_jax.errors import optional_import
from qwenvl_jax.tokenizer import SP_MODEL_NAME, SentencePieceQWenTokenizer


def train_sentencepiece(
    texts: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "bpe"
) -> SentencePieceQWenTokenizer:
    """Train a SentencePiece model for `SentencePieceQWenTokenizer` and load it.

    The model has 256 byte-fallback pieces (so any text encodes and image paths get byte ids),
    digits split one by one (as the Qwen regex does), no normalisation and whitespace kept verbatim
    (so the tokenizer's `decode(encode(text))` gives the NFC text back).

    Args:
      texts: training sentences.
      model_prefix: output path prefix; writes `<prefix>.model` and `<prefix>.vocab`.
      vocab_size: SentencePiece vocabulary size (a soft limit; at least 256 + 1 + distinct chars is
        sensible). The tokenizer adds 217 special tokens on top.
      model_type: "bpe" or "unigram".

    Returns:
      the loaded tokenizer.
    """
    spm = optional_import("sentencepiece", "demo")

    texts = [unicodedata.normalize("NFC", t) for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,  # the default (4192 bytes) silently drops longer texts
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return SentencePieceQWenTokenizer(model_prefix + ".model")


def build_tokenizer(
    corpus: str, out_dir: str, vocab_size: int, image_span: int
) -> SentencePieceQWenTokenizer:
    """Trains (or loads) the SentencePiece tokenizer of the demo in `out_dir/tokenizer.model`;
    its `<img>` spans hold `image_span` positions (the model's n_queries).

    Args:
      corpus: a text file, one training sentence a line (blank lines skipped).
      out_dir: where the model goes; an existing model there is loaded, not retrained.
      vocab_size: SentencePiece pieces (see `train_sentencepiece`).
      image_span: inner positions of an `<img>` span.
    """
    model_file = os.path.join(out_dir, SP_MODEL_NAME)
    if not os.path.isfile(model_file):
        with open(corpus) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        prefix = os.path.join(out_dir, os.path.splitext(SP_MODEL_NAME)[0])
        train_sentencepiece(texts, prefix, vocab_size)
    return SentencePieceQWenTokenizer(model_file, image_span=image_span)
