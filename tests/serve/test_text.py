"""The server's incremental answer text against the tokenizer's own decode of the whole answer."""

from qwenvl_jax.serve.text import AnswerText


def _stream(tok, ids, stops=(), chat=False):
    """Feeds ids one by one; (the pieces sent along the way, the final piece, the AnswerText)."""
    text = AnswerText(tok, (), list(stops), chat)
    pieces = []
    for i in ids:
        if text.add(i):
            break
        pieces.append(text.delta())
    return pieces, text.delta(final=True), text


def test_character_split_over_tokens(tok):
    # U+1D518 is two tokens (three bytes, then one): neither token alone is UTF-8. The text
    # after each token equals decode of the ids so far without the incomplete character, and
    # nothing sent is a replacement character.
    s = "a 𝔘 b 世界 𝔘𝔘 é"
    ids = tok.encode(s)
    assert any(not isinstance(p, str) and len(p) == 1 and p[0] >= 0x80
               for p in tok.convert_ids_to_tokens(ids))  # fmt: skip
    text = AnswerText(tok, (), [], chat=False)
    for n, i in enumerate(ids, 1):
        text.add(i)
        assert text.text == tok.decode(ids[:n]).rstrip("\ufffd")
    pieces, last, text = _stream(tok, ids)
    assert "".join(pieces) + last == s == text.final()
    assert not any("\ufffd" in p for p in pieces)


def test_invalid_bytes_at_the_end_are_replaced_as_decode_does(tok):
    ids = tok.encode("x 𝔘")[:-1]  # the character's last byte never comes
    pieces, last, text = _stream(tok, ids)
    assert text.final() == tok.decode(ids) and text.final().endswith("\ufffd")
    assert "".join(pieces) + last == tok.decode(ids)


def test_stop_string_across_tokens_and_held_back(tok):
    ids = tok.encode("one two three four five")
    pieces, last, text = _stream(tok, ids, stops=["e fo"])
    assert text.final() == "one two thre" and text.finish == "stop"
    # The stop string's beginning was never sent before it was known to be one.
    assert "".join(pieces) + last == "one two thre"
    assert all("e f" not in p for p in pieces)


def test_chat_strips_like_the_published_chat(tok):
    ids = tok.encode("  \n hi there \n ")
    pieces, last, text = _stream(tok, ids, chat=True)
    assert text.final() == "hi there" == "".join(pieces) + last
    assert not pieces[-1].endswith(" ")  # trailing whitespace waited for the final strip


def test_image_span_in_the_answer_decodes_whole(tok):
    ids = tok.encode("see <img>cat.png</img> there")
    pieces, last, text = _stream(tok, ids)
    assert text.final() == tok.decode(ids) == "".join(pieces) + last
