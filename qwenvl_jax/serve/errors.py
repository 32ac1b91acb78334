"""The server's request errors: one exception carrying the HTTP status and OpenAI's error fields.

Every problem a client causes becomes an `APIError`; the app turns it into
`{"error": {"message", "type", "param", "code"}}` with its status, the shape the OpenAI API and
vLLM answer with, so the `openai` client raises its matching exception (BadRequestError, ...).
"""

from __future__ import annotations


class APIError(Exception):
    """A request the server refuses.

    Attributes:
      status: the HTTP status (400, 404, 413, 429, 503).
      message: one line naming the request field and the problem.
      param: the request field at fault ("messages[0].content[1].image_url.url"), or None.
      code: a short machine-readable name ("invalid_image", "queue_full", ...).
      type: OpenAI's error type ("invalid_request_error", ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        """The JSON body of the error response."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    """A 400 `invalid_request_error`."""
    return APIError(400, message, param=param, code=code)
