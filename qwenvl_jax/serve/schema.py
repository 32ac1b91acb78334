"""Request bodies of the OpenAI-compatible endpoints as pydantic models.

Fields follow the OpenAI API (and vLLM) for what the engine supports; a field the server does not
know is refused (`extra="forbid"`) rather than silently ignored, so a client asking for
`logprobs` or `tools` learns that it gets none. `validation_message` turns pydantic's first error
into the one line of the 400 answer, naming the field ("messages[0].content[1].type: ...").
"""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid")


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, no effect (one resolution)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. None means the model's generation defaults."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Sampling):
    """A raw prompt for the base model; `<img>URL</img>` spans in it carry the images."""

    prompt: str | list[str]
    echo: Literal[False] = False

    @pydantic.field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(f"one prompt per request, got a list of {len(v)}")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


def _loc(loc) -> str:
    """pydantic's error location as the client's field path: union members ("str",
    "list[...]") and the tag of a tagged union (the part's `type`) are pydantic's, not fields."""
    out, skip_tag = "", 0
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            skip_tag = 2 if skip_tag == 1 else 0
        elif part in ("str", "int", "bool", "float") or "[" in part:
            skip_tag = 1 if "tagged-union" in part else 0
        elif skip_tag == 2:
            skip_tag = 0
        else:
            out += f".{part}" if out else part
    return out


def validation_message(err: pydantic.ValidationError) -> tuple[str, str | None]:
    """(one line, the field path) for the first error of a request body."""
    errors = err.errors(include_url=False)
    # A union (str | list) reports one error per member; the list member's is the informative one
    # when the client sent a list, the str member's otherwise: prefer the deepest location.
    first = max(errors, key=lambda e: len(e["loc"])) if errors else None
    if first is None:
        return str(err), None
    param = _loc(first["loc"]) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field (not supported by this server)"
    elif first["type"] == "missing":
        msg = "field required"
    if first["type"] == "union_tag_invalid":
        msg = (
            f"unknown content part type {first.get('input', {}).get('type')!r}"
            if isinstance(first.get("input"), dict)
            else msg
        )
    return (f"{param}: {msg}" if param else msg), param
