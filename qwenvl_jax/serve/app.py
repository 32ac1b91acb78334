"""The OpenAI-compatible HTTP app (FastAPI) over a running `serve.engine.Engine`.

    POST /v1/chat/completions   ChatML chat with image_url parts, streaming (SSE) or not
    POST /v1/completions        raw base-model prompts, `<img>URL</img>` spans for images
    GET  /v1/models  /health  /metrics

Bodies are read and validated here (not by FastAPI's parameter injection) so that every refusal is
one OpenAI-shaped error naming the field: `{"error": {"message", "type", "param", "code"}}`.
Stop strings are cut here (the engine stops on token ids only): when one appears the request is
cancelled and the text ends before it. A client that disconnects cancels its request, which frees
its decode slot at the engine's next step. Answers keep the model's `<ref>/<box>` text and add
`grounding`: the parsed boxes, with pixel coordinates in the last image of the request (the
published drawing's rule).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenvl_jax import grounding
from qwenvl_jax.serve import prompt as prompt_lib
from qwenvl_jax.serve import schema
from qwenvl_jax.serve.engine import EngineRequest, PromptTooLong, QueueFull, Sampling
from qwenvl_jax.serve.errors import APIError, bad_request
from qwenvl_jax.serve.images import DecodedImages, ImageLimits
from qwenvl_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from qwenvl_jax.serve.text import AnswerText

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The HTTP layer's settings.

    Attributes:
      model_name: the name clients pass as `model` (and /v1/models lists).
      max_seq_len: prompt + new tokens per request (the engine's).
      limits: per-image limits and the allowed local directory.
      max_images: images per request.
      max_body_bytes: request body size.
      allow_http_images: fetch http(s) image URLs.
      decoded_image_cache_mb: bound of the decoded-image cache (`images.DecodedImages`), MiB.
    """

    model_name: str
    max_seq_len: int
    limits: ImageLimits = ImageLimits()
    max_images: int = 8
    max_body_bytes: int = 64 * 2**20
    allow_http_images: bool = True
    decoded_image_cache_mb: float = 64.0


def _boxes(text: str, prompt: prompt_lib.Prompt) -> list[dict]:
    """The `grounding` field: parsed boxes with pixels in the request's last image."""
    size = (prompt.images[-1].width, prompt.images[-1].height) if prompt.images else None
    try:
        boxes = grounding.parse_grounding(text, size)
    except ValueError:  # an unclosed or malformed tag in the answer: no boxes to give
        return []
    return [dataclasses.asdict(b) for b in boxes]


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine, config: ServerConfig) -> FastAPI:
    """The app serving `engine` (started by the caller, who also shuts it down)."""
    metrics = ServerMetrics(engine)
    tok = engine.tokenizer
    model = engine.model
    gen = getattr(model, "generation_config", {}) or {}
    default_temperature = float(gen.get("temperature") or 1.0) if gen.get("do_sample") else 0.0
    default_top_p = float(gen.get("top_p") or 1.0) if gen.get("do_sample") else 1.0
    default_max_tokens = int(gen.get("max_new_tokens") or 512)
    created = int(time.time())
    state = {"http": None, "draining": False}
    decoded = DecodedImages(config.decoded_image_cache_mb)

    async def lifespan(app):
        import httpx

        state["http"] = httpx.AsyncClient() if config.allow_http_images else None
        yield
        state["draining"] = True
        if state["http"] is not None:
            await state["http"].aclose()

    app = FastAPI(title="qwenvl_jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.decoded_images = decoded

    def ctx() -> prompt_lib.RequestContext:
        return prompt_lib.RequestContext(
            tokenizer=tok,
            image_size=model.config.visual.image_size,
            limits=config.limits,
            max_images=config.max_images,
            http=state["http"],
            max_window_size=int(gen.get("max_window_size") or prompt_lib.chat_lib.MAX_WINDOW_SIZE),
            decoded=decoded,
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(APIError(e.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request failed")
        return _error_response(
            APIError(
                500,
                f"internal error: {type(e).__name__}: {e}",
                type="server_error",
                code="internal_error",
            )
        )

    app.add_middleware(_CountRequests, counter=metrics.requests)

    async def parse(request: Request, model_cls):
        body = await request.body()
        if len(body) > config.max_body_bytes:
            raise APIError(
                413,
                f"request body is {len(body)} bytes; the limit is {config.max_body_bytes}",
                code="body_too_large",
            )
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(
                f"request body is not valid JSON: {e}", None, "invalid_json"
            ) from None
        if not isinstance(obj, dict):
            raise bad_request(
                f"request body must be a JSON object, got {type(obj).__name__}",
                None,
                "invalid_json",
            )
        try:
            req = model_cls.model_validate(obj)
        except pydantic.ValidationError as e:
            msg, param = schema.validation_message(e)
            raise bad_request(msg, param, "invalid_value") from None
        if req.model != config.model_name:
            raise APIError(
                404,
                f"model: the model {req.model!r} does not exist; this server"
                f" serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return req

    def submit(req, prompt: prompt_lib.Prompt, max_tokens: int | None):
        n = len(prompt.ids)
        field = "messages" if prompt.chat else "prompt"
        if n >= config.max_seq_len:
            raise bad_request(
                f"{field}: the prompt has {n} tokens; this server's max_seq_len is"
                f" {config.max_seq_len} (prompt + new tokens)",
                field,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(default_max_tokens, config.max_seq_len - n)
        elif n + max_tokens > config.max_seq_len:
            raise bad_request(
                f"max_tokens: the prompt has {n} tokens and max_tokens is {max_tokens}, more than"
                f" this server's max_seq_len of {config.max_seq_len}",
                "max_tokens",
                "context_length_exceeded",
            )
        temperature = default_temperature if req.temperature is None else req.temperature
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=default_top_p if req.top_p is None else req.top_p,
            seed=req.seed,
            stop_ids=prompt.stop_ids,
        )
        er = EngineRequest(prompt.ids, [im.input for im in prompt.images], sampling)
        try:
            return engine.submit(er)
        except QueueFull as e:
            if state["draining"]:
                raise APIError(
                    503,
                    f"the server is shutting down: {e}",
                    type="server_error",
                    code="shutting_down",
                ) from None
            raise APIError(
                429,
                f"the server is busy: {e}; retry later",
                type="rate_limit_error",
                code="queue_full",
            ) from None
        except PromptTooLong as e:
            raise bad_request(
                str(e), "messages" if prompt.chat else "prompt", "context_length_exceeded"
            ) from None
        except ValueError as e:
            raise bad_request(str(e), None, "invalid_request") from None

    async def events(handle, text: AnswerText, t0: float):
        """(delta, finish_reason or None) as tokens arrive; cancels the engine request when a
        stop string ends it early or when the consumer goes away. The tokens that arrived since
        the last wake-up make one delta: a consumer that falls behind the engine sends fewer,
        longer chunks instead of one per token."""
        t_first = t_last = None
        ended = False
        try:
            async for batch in handle.abatches():
                for ev in batch:
                    if ev.kind == "token":
                        t_last = time.perf_counter()
                        if t_first is None:
                            t_first = t_last
                            metrics.ttft.observe(t_first - t0)
                        if text.add(ev.token):
                            handle.cancel()
                            ended = True
                            break
                    elif ev.kind == "error":
                        raise APIError(
                            500,
                            f"generation failed: {ev.message}",
                            type="server_error",
                            code="engine_error",
                        )
                    else:
                        text.finish = text.finish or ev.finish_reason
                        ended = True
                        break
                if ended:
                    break
                piece = text.delta()
                if piece:
                    yield piece, None
        finally:
            if not handle.finished:
                handle.cancel()
        if t_first is not None and text.n_tokens > 1:
            metrics.tpot.observe((t_last - t_first) / (text.n_tokens - 1))
        yield text.delta(final=True), text.finish or "stop"

    def usage(prompt, text: AnswerText) -> dict:
        n = len(prompt.ids)
        return {
            "prompt_tokens": n,
            "completion_tokens": text.n_tokens,
            "total_tokens": n + text.n_tokens,
        }

    async def watch_disconnect(request: Request, handle):
        # After the body, the receive channel only says "http.disconnect" (client gone).
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return

    async def respond(request, req, prompt, max_tokens, kind: str):
        t0 = request.state.t0
        handle = submit(req, prompt, max_tokens)
        text = AnswerText(tok, prompt.stop_ids, list(req.stop or []), prompt.chat)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": config.model_name}

        def choice(piece: str, finish, final_text: str | None):
            if kind == "chat":
                c = {"index": 0, "delta": {"content": piece}, "finish_reason": finish}
                if final_text is not None:
                    c["delta"]["grounding"] = _boxes(final_text, prompt)
            else:
                c = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
                if final_text is not None:
                    c["grounding"] = _boxes(final_text, prompt)
            return c

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def sse():
                chunk_obj = obj + ".chunk" if kind == "chat" else obj
                # Starlette notices a disconnect only when a write fails (ASGI spec >= 2.4); a
                # request still queued writes nothing, so watch the channel from the start.
                watcher = asyncio.create_task(watch_disconnect(request, handle))
                try:
                    if kind == "chat":
                        first = {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                        yield _sse({**head, "object": chunk_obj, "choices": [first]})
                    # Every chunk but the last differs only in its text: the same bytes as
                    # _sse(chunk) from a template, one json.dumps of the piece per chunk.
                    mark = json.dumps("\0piece\0")
                    c = choice("\0piece\0", None, None)
                    pre, post = _sse({**head, "object": chunk_obj, "choices": [c]}).split(mark)
                    async for piece, finish in events(handle, text, t0):
                        if finish:
                            c = choice(piece, finish, text.final())
                            yield _sse({**head, "object": chunk_obj, "choices": [c]})
                        elif piece:
                            yield pre + json.dumps(piece, ensure_ascii=False) + post
                    if include_usage:
                        yield _sse(
                            {
                                **head,
                                "object": chunk_obj,
                                "choices": [],
                                "usage": usage(prompt, text),
                            }
                        )
                except APIError as e:
                    yield _sse(e.body())
                finally:
                    watcher.cancel()
                    if not handle.finished:
                        handle.cancel()
                yield "data: [DONE]\n\n"

            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        watcher = asyncio.create_task(watch_disconnect(request, handle))
        try:
            finish = "stop"
            async for _, f in events(handle, text, t0):
                finish = f or finish
        finally:
            watcher.cancel()
        final = text.final()
        if kind == "chat":
            c = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": final,
                    "grounding": _boxes(final, prompt),
                },
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            c = choice(final, finish, final)
        return {**head, "object": obj, "choices": [c], "usage": usage(prompt, text)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        request.state.t0 = time.perf_counter()
        req = await parse(request, schema.ChatCompletionRequest)
        prompt = await prompt_lib.chat_prompt(req, ctx())
        return await respond(
            request, req, prompt, req.max_tokens or req.max_completion_tokens, "chat"
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        request.state.t0 = time.perf_counter()
        req = await parse(request, schema.CompletionRequest)
        prompt = await prompt_lib.completion_prompt(req, ctx())
        return await respond(request, req, prompt, req.max_tokens, "completion")

    @app.get("/v1/models")
    async def models():
        card = {
            "id": config.model_name,
            "object": "model",
            "created": created,
            "owned_by": "qwenvl_jax",
            "max_model_len": config.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if state["draining"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        s = engine.stats()
        return {"status": "ok", "queue": s.get("queue"), "running": s.get("running"),
                "slots": s.get("slots")}  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """Counts responses by path and status (plain ASGI: Starlette's BaseHTTPMiddleware would
    stand between a streaming response and the client's disconnect)."""

    def __init__(self, app, counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in _ENDPOINTS else "other"  # bounded labels
                self.counter.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
