"""The answer text of a stream of token ids, decoded incrementally (the server's one owner of it).

`AnswerText.add(token)` takes the engine's tokens one by one and keeps the text equal to
`tokenizer.decode(ids)` of the ids so far (chat answers left-stripped, as the published `chat()`
returns them), without decoding every id again at every token: both tokenizer backends decode a
sequence as the UTF-8 of its tokens' bytes laid end to end (special tokens as their text), so the
new tokens' bytes go through one incremental UTF-8 decoder, which holds back a character split
over tokens until its last byte arrives. Answers holding an `<img>` token (whose span decodes by
the tokenizer's own rules) or an id outside the tokenizer fall back to decoding everything, as
before.

Stop strings (the request's `stop`, which the engine does not know) are looked for only where a
new one can be: in the text added since the last check plus the longest stop string's length
before it. `delta()` gives what is safe to send now (nothing that may still turn out to be part
of a stop string or, for chat, trailing whitespace that the final strip would drop).
"""

from __future__ import annotations

import codecs

from qwenvl_jax.tokenizer import ImageSpanError


class AnswerText:
    """See the module docstring.

    Args:
      tokenizer: the model's tokenizer.
      stop_ids: token-id stop sequences (the engine stops on them and adds eos; the ids are not
        part of the text).
      stop_strs: the request's stop strings (non-empty).
      chat: a chat answer (left- and right-stripped, as `QwenVL.chat`).
    """

    def __init__(self, tokenizer, stop_ids, stop_strs: list[str], chat: bool):
        self.tok = tokenizer
        self.eos = tokenizer.eod_id
        self.stop_ids = [list(s) for s in stop_ids if s]
        self.stop_strs = list(stop_strs)
        self.chat = chat
        self.ids: list[int] = []
        self.n_tokens = 0
        self.finish: str | None = None
        self.text = ""
        self.sent = 0
        # The last len(longest stop-id sequence) - 1 ids stay undecoded: a stop sequence that
        # completes later removes them from the answer.
        self._hold = max((len(s) for s in self.stop_ids), default=1) - 1
        self._longest_stop = max((len(s) for s in self.stop_strs), default=0)
        self._n_decoded = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = not chat  # chat: leading whitespace is not part of the answer
        self._whole = False  # decode every id each time (see the module docstring)
        self._closed = False

    def add(self, token: int) -> bool:
        """Takes one new token; True when a stop string ended the answer (the caller cancels the
        request). After eos or a stop-id sequence the engine ends the request itself (the eos it
        adds after a stop sequence is counted, as `generate` returns it), and later tokens leave
        the text as it is."""
        self.n_tokens += 1
        if self.finish is not None:
            return False
        if token == self.eos:
            self.finish = "stop"
            return self._decode(final=True)
        self.ids.append(token)
        for s in self.stop_ids:
            if len(self.ids) >= len(s) and self.ids[-len(s) :] == s:
                del self.ids[-len(s) :]
                self.finish = "stop"
        return self._decode(final=self.finish is not None)

    def close(self) -> None:
        """The answer is complete (the request ended): decode what was held back."""
        if not self._closed:
            self._decode(final=True)

    def final(self) -> str:
        self.close()
        return self.text.rstrip() if self.chat else self.text

    def delta(self, final: bool = False) -> str:
        """The text not sent yet that is safe to send (all of it when `final`)."""
        if final:
            out = self.final()
            end = len(out)
        else:
            out, end = self.text, len(self.text)
            while end > self.sent and out[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
            for s in self.stop_strs:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if out.endswith(s[:k], 0, end):
                        end -= k
                        break
            if self.chat:
                while end > self.sent and out[end - 1].isspace():
                    end -= 1
        piece = out[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    # ------------------------------------------------------------------ decoding
    def _decode(self, final: bool) -> bool:
        """Decodes the ids not decoded yet (all when `final`); True when a stop string cut the
        text."""
        if self._closed:
            return False
        upto = len(self.ids) if final else len(self.ids) - self._hold
        new = self.ids[self._n_decoded : upto]
        self._n_decoded = max(self._n_decoded, upto)
        self._closed = final
        if not self._whole and new:
            n = self.tok.n_vocab
            img = self.tok.img_start_id
            self._whole = any(i == img or not 0 <= i < n for i in new)
        if self._whole:
            return self._decode_whole(final)
        if not new and not final:
            return False
        pieces = self.tok.convert_ids_to_tokens(new)
        data = b"".join(p if isinstance(p, bytes) else p.encode("utf-8") for p in pieces)
        piece = self._utf8.decode(data, final)
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        # A stop string that ends in the new text starts at most len(stop) - 1 characters
        # before it; every earlier position was searched when its text came.
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        return self._cut(start)

    def _decode_whole(self, final: bool) -> bool:
        ids = self.ids[: self._n_decoded]
        try:
            text = self.tok.decode(ids)
        except ImageSpanError:
            if final:
                raise
            # An `<img>` whose `</img>` has not come yet: the text before it, for now.
            last = len(ids) - 1 - ids[::-1].index(self.tok.img_start_id)
            text = self.tok.decode(ids[:last])
        self.text = text.lstrip() if self.chat else text
        return self._cut(0)

    def _cut(self, start: int) -> bool:
        found = [i for i in (self.text.find(s, start) for s in self.stop_strs) if i >= 0]
        if not found:
            return False
        self.text = self.text[: min(found)]
        self.finish = "stop"
        self._closed = True
        return True
