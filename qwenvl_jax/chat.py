"""The chat format of Qwen-VL-Chat: ChatML prompts, the system prompt, stop words, a batched chat.

A chat prompt is the published `qwen_generation_utils.make_context` ChatML:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{q1}<|im_end|>\\n<|im_start|>assistant\\n{r1}<|im_end|>\\n   (history)
    <|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

Generation stops on `<|im_end|>` or `<|im_start|>` (`STOP_WORDS`), and the response is the text up
to the first of them (`decode_chatml`, the published `chat()`'s cut). `make_context` and
`decode_chatml` are checked against fixtures made with the published code.

`chat_batch` is the one batched chat: prompts for many queries, one `QwenVL.generate_batch`, the
responses. `QwenVL.chat`, the demo's evaluation and the benchmark evaluator (`chat=True`) call it.
Training conversations (labels included) are encoded by `qwenvl_jax.data.tasks.chatml_ids`, as the
published `finetune.py`, with the same system prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qwenvl_jax.grounding import box_text
from qwenvl_jax.tokenizer import (
    IMAGE_ST,
    IMEND,
    IMG_END,
    IMG_START,
    IMSTART,
    REF_END,
    REF_START,
    Tokenizer,
)

# The published default system prompt (make_context, chat(), finetune.py, the eval scripts).
SYSTEM = "You are a helpful assistant."
# The published chat()'s history window in tokens (generation_config.json's max_window_size).
MAX_WINDOW_SIZE = 6144
# ChatML generation ends on either marker (the published `get_stop_words_ids("chatml")`).
STOP_WORDS = (IMEND, IMSTART)
# `chat_batch`'s response decodings (see there).
DECODINGS = ("chat", "eval")

History = Sequence[tuple[str, str | None]]


def from_list_format(items: Sequence[dict]) -> str:
    """Query text from a list of `{'image': path}`, `{'text': t}`, `{'box': [...], 'ref': r}` items.

    Images are numbered from 1 as `Picture n: <img>path</img>\\n` (the later published revision,
    with a space after the colon); boxes are `<box>(x1,y1),(x2,y2)</box>` with the integer parts of
    the coordinates (the published `%d`).
    """
    text, n_images = "", 0
    for k, item in enumerate(items):
        if "image" in item:
            n_images += 1
            text += f"Picture {n_images}: {IMG_START}{item['image']}{IMG_END}\n"
        elif "text" in item:
            text += item["text"]
        elif "box" in item:
            if "ref" in item:
                text += f"{REF_START}{item['ref']}{REF_END}"
            for box in item["box"]:
                if len(box) != 4:
                    raise ValueError(
                        f"item {k}: a box needs 4 numbers (x1, y1, x2, y2), got {box!r}"
                    )
                text += box_text(["%d" % v for v in box])
        else:
            raise ValueError(
                f"item {k}: unsupported element {item!r} (expected image, text or box)"
            )
    return text


def _turn_text(role: str, content: str) -> str:
    return f"{IMSTART}{role}\n{content}{IMEND}"


def prompt_text(query: str, history: History | None = None, system: str = SYSTEM) -> str:
    """The ChatML prompt as text, every history turn kept (`make_context`'s text; no tokenizer).

    A history turn whose response is None is written as the published code writes it: the user
    turn, then a bare "\\n" (no assistant turn).
    """
    text = _turn_text("system", system)
    for turn_query, turn_response in history or []:
        text += "\n" + _turn_text("user", turn_query) + "\n"
        if turn_response is not None:
            text += _turn_text("assistant", turn_response)
    return text + "\n" + _turn_text("user", query) + f"\n{IMSTART}assistant\n"


def make_context(
    tokenizer: Tokenizer,
    query: str,
    history: History | None = None,
    system: str = SYSTEM,
    max_window_size: int = MAX_WINDOW_SIZE,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """The prompt text and ids of the published `make_context`.

    ChatML turns are encoded piece by piece (`<|im_start|>` + role + "\\n" + content + `<|im_end|>`,
    joined by "\\n"), content with only the image/box tags parsed as special. History turns are
    added newest first while the total stays below `max_window_size`; older ones are dropped.

    Args:
      tokenizer: either backend of `qwenvl_jax.tokenizer`.
      query: the user's text (may hold `<img>path</img>`).
      history: earlier (query, response) turns, oldest first.
      system: the system prompt.
      max_window_size: the token budget for the system turn plus the kept history.
      chat_format: "chatml", or "raw" (the query alone, for base models).

    Returns:
      (raw_text, context_tokens): the prompt as text and as ids; the model continues after the final
      `<|im_start|>assistant\\n`.
    """
    history = list(history or [])
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise ValueError(f"unknown chat_format {chat_format!r}; expected 'chatml' or 'raw'")
    im_start, im_end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode("\n")
    image_st = set(IMAGE_ST)

    def turn(role: str, content: str) -> list[int]:
        ids = tokenizer.encode(role, allowed_special=image_st) + nl
        ids += tokenizer.encode(content, allowed_special=image_st)
        return im_start + ids + im_end

    system_tokens = turn("system", system)
    context: list[int] = []
    kept = 0
    for turn_query, turn_response in reversed(history):
        next_tokens = nl + turn("user", turn_query) + nl
        if turn_response is not None:
            next_tokens += turn("assistant", turn_response)
        if len(system_tokens) + len(next_tokens) + len(context) >= max_window_size:
            break
        context = next_tokens + context
        kept += 1
    context = system_tokens + context
    context += nl + turn("user", query) + nl + im_start + tokenizer.encode("assistant") + nl
    return prompt_text(query, history[len(history) - kept :], system), context


def stop_words_ids(tokenizer: Tokenizer, chat_format: str = "chatml") -> list[list[int]]:
    """Stop sequences of the published `chat()`: `<|im_end|>`, `<|im_start|>` (ChatML)."""
    if chat_format == "chatml":
        return [[i] for i in _stop_ids(tokenizer)]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise ValueError(f"unknown chat_format {chat_format!r}")


def _stop_ids(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.special_tokens[w] for w in STOP_WORDS]


def decode_chatml(
    tokenizer: Tokenizer,
    tokens: Sequence[int],
    raw_text_len: int,
    context_length: int,
    errors: str = "replace",
) -> str:
    """The response text of a ChatML generation, as the published `chat()` extracts it.

    Args:
      tokenizer: the tokenizer that made the prompt.
      tokens: prompt ids followed by the generated ids.
      raw_text_len: len(raw_text) of `make_context`; the decoded prompt is cut off by characters.
      context_length: number of prompt ids.
      errors: how invalid UTF-8 is decoded.

    Returns:
      the generated text up to the first `<|im_start|>`/`<|im_end|>`, stripped.
    """
    tokens = [int(t) for t in tokens]
    stop = set(_stop_ids(tokenizer))
    # QWEN-QUIRK: the published loop leaves its index on the *last* token when no stop token is
    # found, so a generation cut by max_new_tokens loses its final token.
    eod = context_length
    for eod in range(context_length, len(tokens)):
        if tokens[eod] in stop:
            break
    return tokenizer.decode(tokens[:eod], errors=errors)[raw_text_len:].strip()


def _decode_eval(tokenizer: Tokenizer, new_ids: Sequence[int]) -> str:
    """Generated ids as the benchmark evaluator decodes them: up to the first stop word, special
    tokens skipped, nothing stripped."""
    stop = set(_stop_ids(tokenizer))
    cut = next((i for i, t in enumerate(new_ids) if t in stop), len(new_ids))
    return tokenizer.decode(list(new_ids)[:cut], skip_special_tokens=True)


def chat_batch(
    qwen: Any,
    queries: Sequence[str],
    histories: Sequence[History | None] | None = None,
    *,
    system: str = SYSTEM,
    max_window_size: int | None = None,
    stop_words_ids: Sequence[Sequence[int]] | None = None,
    decode: str = "chat",
    seed: int = 0,
    **generation: Any,
) -> list[str]:
    """One ChatML turn for each query, generated together: the batched `QwenVL.chat`.

    Each row's prompt is `make_context(query, history)`, the rows are left-padded into one
    `qwen.generate_batch` (rows may hold different numbers of pictures), and every row stops on
    `<|im_end|>` / `<|im_start|>` (plus `stop_words_ids`) on its own. With the same generation
    arguments row b equals `qwen.chat(queries[b], histories[b])`'s response.

    Args:
      qwen: a `qwenvl_jax.api.QwenVL` (its tokenizer, generation_config and generate_batch).
      queries: the user turns (may hold `<img>path</img>`).
      histories: one history (or None) per query; None: no history for any.
      system: the system prompt.
      max_window_size: history budget in tokens; default: the model's generation_config
        max_window_size, else 6144 (published).
      stop_words_ids: extra stop sequences.
      decode: "chat": the published `chat()`'s response (`decode_chatml`: the text after the
        prompt up to the first stop word, stripped); "eval": the benchmark evaluator's (the new
        ids up to the first stop word decoded with special tokens skipped, as the eval_mm
        scripts decode, nothing stripped, no token lost).
      seed: PRNG seed for sampling.
      **generation: `qwen.generate_batch`'s arguments (max_new_tokens, do_sample, top_p, top_k,
        temperature, min_new_tokens, batch_multiple); defaults from `qwen.generation_config`.

    Returns:
      one response per query, in order.
    """
    if decode not in DECODINGS:
        raise ValueError(f"unknown decode {decode!r}; expected one of {DECODINGS}")
    if histories is None:
        histories = [None] * len(queries)
    if len(histories) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(histories)} histories")
    tok = qwen.tokenizer
    window = max_window_size or qwen.generation_config.get("max_window_size", MAX_WINDOW_SIZE)
    prompts = [
        make_context(tok, q, history=h, system=system, max_window_size=window)
        for q, h in zip(queries, histories, strict=True)
    ]
    stops = [list(s) for s in (stop_words_ids or [])] + [[i] for i in _stop_ids(tok)]
    new = qwen.generate_batch(
        [context for _, context in prompts], stop_words_ids=stops, seed=seed, **generation
    )
    if decode == "eval":
        return [_decode_eval(tok, n) for n in new]
    return [
        decode_chatml(tok, list(context) + list(n), len(raw), len(context))
        for (raw, context), n in zip(prompts, new, strict=True)
    ]
