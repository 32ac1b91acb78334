"""The chat format: ChatML prompts and response cuts against fixtures made by the published code,
and the batched chat against `QwenVL.chat` row by row on a tiny random model."""

import json
import os

import pytest
from reference_weights import REF

from qwenvl_jax import QwenVL, chat
from qwenvl_jax.demo.vocab import train_sentencepiece

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")


def _fixture(name):
    with open(os.path.join(FIXTURES, name), encoding="utf8") as f:
        return json.load(f)


# ---------------------------------------------------------------------- the published format
def test_single_turn_context_layout(tok):
    raw, ids = chat.make_context(tok, "Hi")
    q = tok.encode("Hi")
    # Ids by hand from the spec (§5): <|im_start|>=151644, "system"=8948, "\n"=198, ...
    head = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    assert ids == head + q + [151645, 198, 151644, 77091, 198]
    assert raw == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(ids) == raw


def test_make_context_matches_published(tok):
    cases = _fixture("make_context.json")
    assert any(c["max_window_size"] < 6144 for c in cases)
    for c in cases:
        history = [tuple(h) for h in c["history"]] if c["history"] is not None else None
        raw, ids = chat.make_context(
            tok,
            c["query"],
            history=history,
            system=c["system"],
            max_window_size=c["max_window_size"],
        )
        assert raw == c["raw_text"], c["query"]
        assert ids == c["context_tokens"], (c["query"], c["max_window_size"])


def test_prompt_text_matches_published_make_context():
    # The text alone (no tokenizer): the published raw_text whenever no history turn is dropped.
    cases = [c for c in _fixture("make_context.json") if c["max_window_size"] >= 6144]
    assert any(c["history"] for c in cases) and any(not c["history"] for c in cases)
    for c in cases:
        history = [tuple(h) for h in c["history"] or []]
        assert chat.prompt_text(c["query"], history, system=c["system"]) == c["raw_text"]
    assert chat.prompt_text("<img>a.jpg</img>Why? Answer:") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<img>a.jpg</img>Why? Answer:<|im_end|>\n<|im_start|>assistant\n"
    )


def test_decode_chatml_matches_published(tok):
    for c in _fixture("decode_chatml.json"):
        got = chat.decode_chatml(tok, c["tokens"], c["raw_text_len"], c["context_length"])
        assert got == c["response"]


def test_stop_words(tok):
    # The published get_stop_words_ids: <|im_end|>, <|im_start|> (chatml); "Human:", eod (raw).
    assert chat.stop_words_ids(tok) == [[151645], [151644]]
    assert chat.stop_words_ids(tok, "raw") == [tok.encode("Human:"), [151643]]
    with pytest.raises(ValueError, match="unknown chat_format 'xml'"):
        chat.stop_words_ids(tok, "xml")
    with pytest.raises(ValueError, match="unknown chat_format 'xml'"):
        chat.make_context(tok, "hi", chat_format="xml")
    assert chat.make_context(tok, "hi", chat_format="raw") == ("hi", tok.encode("hi"))


def test_from_list_format_matches_published():
    for c in _fixture("from_list_format.json"):
        assert chat.from_list_format(c["items"]) == c["text"]


def test_from_list_format_rejects_unknown_items():
    with pytest.raises(ValueError, match="item 1"):
        chat.from_list_format([{"text": "a"}, {"video": "b.mp4"}])
    with pytest.raises(ValueError, match="item 0: a box needs 4 numbers"):
        chat.from_list_format([{"box": [(1, 2, 3)]}])


def test_sentencepiece_make_context(tmp_path):
    sp = train_sentencepiece(["What is this? A dog.", "hi there"] * 10, str(tmp_path / "sp"), 300)
    raw, ids = chat.make_context(sp, "hi", history=[("a", "b")])
    assert sp.decode(ids) == raw == chat.prompt_text("hi", [("a", "b")])
    assert ids[0] == sp.im_start_id and ids[-1] == sp.encode("\n")[0]


# ---------------------------------------------------------------------- the batched chat
@pytest.fixture(scope="module")
def vl():
    return QwenVL.random("tiny", seed=5)


def test_chat_batch_equals_chat_row_by_row(vl, monkeypatch):
    monkeypatch.chdir(REF)  # the queries' pictures
    # Rows of different lengths and picture counts (the text row's images are zero padding).
    queries = [
        "Hello there, who are you?",
        chat.from_list_format([{"image": "img_a.png"}, {"image": "img_b.jpg"}, {"text": "Same?"}]),
    ]
    histories = [[("Earlier?", "Yes.")], None]
    kw = dict(max_new_tokens=5, do_sample=False)
    batched = chat.chat_batch(vl, queries, histories, **kw)
    assert len(batched) == 2 and all(isinstance(r, str) for r in batched)
    for q, h, b in zip(queries, histories, batched, strict=True):
        response, _ = vl.chat(q, history=list(h or []), **kw)
        assert response == b, q
    # The responses differ between rows (so a row mix-up would show).
    assert batched[0] != batched[1]


def test_chat_batch_eval_decoding(vl):
    # decode="eval" is the evaluator's: the new ids, special tokens skipped, nothing dropped. The
    # published chat() cut loses the last token when no stop word ends the generation.
    query, n = "Tell me a story.", 4
    raw, context = chat.make_context(vl.tokenizer, query)
    new = vl.generate(context, max_new_tokens=n, do_sample=False)
    assert len(new) == n and not set(new) & {vl.tokenizer.im_end_id, vl.tokenizer.im_start_id}
    (got,) = chat.chat_batch(vl, [query], decode="eval", max_new_tokens=n, do_sample=False)
    assert got == vl.tokenizer.decode(new, skip_special_tokens=True)
    (published,) = chat.chat_batch(vl, [query], max_new_tokens=n, do_sample=False)
    assert published == vl.tokenizer.decode(context + new[:-1])[len(raw) :].strip()


def test_chat_batch_errors(vl):
    with pytest.raises(ValueError, match="2 queries but 1 histories"):
        chat.chat_batch(vl, ["a", "b"], [None])
    with pytest.raises(ValueError, match="unknown decode 'raw'"):
        chat.chat_batch(vl, ["a"], decode="raw")
