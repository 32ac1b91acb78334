"""From a validated request to the engine's prompt: ChatML text, image spans, token ids.

Chat: `messages` become the published `make_context` prompt, as `QwenVL.chat` builds it. An
optional first system message replaces the default system prompt; then user and assistant turns
alternate and the last one is the user's query. A message's parts become its text with
`chat.from_list_format` (images numbered `Picture k: <img>...</img>` per message, as the published
`from_list_format` numbers them per query).

Completions: the raw prompt is tokenised as `QwenVL.generate` tokenises it.

In both, every `<img>SRC</img>` span (from an `image_url` part, or written in the text) is read by
`serve.images`, and the span then holds a short content label (the first bytes of the image's
sha256) instead of SRC: the model never sees a span's inner bytes (image features replace them),
a data: URL would not fit in a span, and equal images give equal prompt ids.
"""

from __future__ import annotations

import dataclasses
import re

from qwenvl_jax import chat as chat_lib
from qwenvl_jax.serve import images as images_lib
from qwenvl_jax.serve.errors import bad_request
from qwenvl_jax.serve.schema import ChatCompletionRequest, CompletionRequest, TextPart
from qwenvl_jax.tokenizer import IMG_END, IMG_START

_SPAN = re.compile(re.escape(IMG_START) + "(.*?)" + re.escape(IMG_END), re.S)


@dataclasses.dataclass
class Prompt:
    """What the engine needs, plus what the answer needs.

    Attributes:
      text: the prompt text with labelled spans.
      ids: its token ids (expanded spans).
      images: the loaded images in span order.
      stop_ids: token-id stop sequences (ChatML's markers for chat).
      chat: whether the answer is a chat turn (stripped, as the published `chat()` returns it).
    """

    text: str
    ids: list[int]
    images: list[images_lib.LoadedImage]
    stop_ids: tuple[tuple[int, ...], ...]
    chat: bool


class _Images:
    """Loads the spans' sources of one request, in order, under the image count limit."""

    def __init__(self, ctx: RequestContext):
        self.ctx = ctx
        self.loaded: list[images_lib.LoadedImage] = []

    async def add(self, src: str, param: str) -> str:
        if len(self.loaded) >= self.ctx.max_images:
            raise bad_request(
                f"{param}: too many images; at most {self.ctx.max_images} per request",
                param,
                "too_many_images",
            )
        img = await images_lib.load(
            src.strip(), self.ctx.image_size, self.ctx.limits, param, self.ctx.http,
            self.ctx.decoded,
        )  # fmt: skip
        self.loaded.append(img)
        return img.input.key[: self.ctx.label_bytes]

    async def text(self, text: str, param: str) -> str:
        """`text` with each `<img>SRC</img>` loaded and relabelled."""
        out, pos = [], 0
        for m in _SPAN.finditer(text):
            out.append(text[pos : m.start()])
            label = await self.add(m.group(1), f"{param} (<img> span {len(self.loaded) + 1})")
            out.append(f"{IMG_START}{label}{IMG_END}")
            pos = m.end()
        out.append(text[pos:])
        rest = "".join(out)
        if IMG_START in _SPAN.sub("", rest) or IMG_END in _SPAN.sub("", rest):
            raise bad_request(
                f"{param}: an {IMG_START} without its {IMG_END}", param, "bad_image_tag"
            )
        return rest


@dataclasses.dataclass
class RequestContext:
    """What prompt building needs from the server.

    Attributes:
      tokenizer: the model's tokenizer.
      image_size: the model's input resolution.
      limits: per-image limits.
      max_images: images per request.
      http: an httpx.AsyncClient for http(s) image URLs (None refuses them).
      max_window_size: ChatML history budget in tokens (make_context).
      decoded: the server's decoded-image cache (None: decode every time).
    """

    tokenizer: object
    image_size: int
    limits: images_lib.ImageLimits
    max_images: int = 8
    http: object = None
    max_window_size: int = chat_lib.MAX_WINDOW_SIZE
    decoded: images_lib.DecodedImages | None = None

    @property
    def label_bytes(self) -> int:
        return min(16, self.tokenizer.max_image_path_bytes)


async def _message_text(msg, param: str, imgs: _Images) -> str:
    if isinstance(msg.content, str):
        return await imgs.text(msg.content, f"{param}.content")
    items = []
    for k, part in enumerate(msg.content):
        p = f"{param}.content[{k}]"
        if isinstance(part, TextPart):
            items.append({"text": await imgs.text(part.text, f"{p}.text")})
        else:
            items.append({"image": await imgs.add(part.image_url.url, f"{p}.image_url.url")})
    return chat_lib.from_list_format(items)


async def chat_prompt(req: ChatCompletionRequest, ctx: RequestContext) -> Prompt:
    """The ChatML prompt of a chat request (see the module docstring)."""
    msgs = list(req.messages)
    imgs = _Images(ctx)
    system = chat_lib.SYSTEM
    start = 0
    if msgs[0].role == "system":
        if not isinstance(msgs[0].content, str) and any(
            not isinstance(p, TextPart) for p in msgs[0].content
        ):
            raise bad_request(
                "messages[0].content: a system message holds text only", "messages[0]"
            )
        system = await _message_text(msgs[0], "messages[0]", imgs)
        start = 1
    texts = []
    for i in range(start, len(msgs)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if msgs[i].role != want:
            raise bad_request(
                f"messages[{i}].role: expected {want!r} (after an optional system message, user"
                f" and assistant turns alternate), got {msgs[i].role!r}",
                f"messages[{i}].role",
                "invalid_role",
            )
        texts.append(await _message_text(msgs[i], f"messages[{i}]", imgs))
    if len(texts) % 2 == 0:
        raise bad_request(
            f"messages[{len(msgs) - 1}]: the last message must be the user's",
            f"messages[{len(msgs) - 1}].role",
            "invalid_role",
        )
    history = list(zip(texts[0:-1:2], texts[1:-1:2], strict=True))
    tok = ctx.tokenizer
    try:
        raw, ids = chat_lib.make_context(
            tok, texts[-1], history, system=system, max_window_size=ctx.max_window_size
        )
    except ValueError as e:  # e.g. a span label the tokenizer refuses
        raise bad_request(f"messages: {e}", "messages") from None
    # make_context drops the oldest history turns past the window: their images go with them.
    n_spans = len(tok.image_spans(ids))
    kept = imgs.loaded[len(imgs.loaded) - n_spans :] if n_spans else []
    stops = tuple(tuple(s) for s in chat_lib.stop_words_ids(tok))
    return Prompt(raw, ids, kept, stops, chat=True)


async def completion_prompt(req: CompletionRequest, ctx: RequestContext) -> Prompt:
    """The raw prompt of a completion request, its `<img>SRC</img>` spans loaded."""
    imgs = _Images(ctx)
    text = await imgs.text(req.prompt, "prompt")
    try:
        ids = ctx.tokenizer.encode(text)
    except ValueError as e:
        raise bad_request(f"prompt: {e}", "prompt") from None
    return Prompt(text, ids, imgs.loaded, (), chat=False)
