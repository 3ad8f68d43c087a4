"""OpenAI-style error objects: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers with goes through ``ApiError`` (or is converted to one by
the app's exception handlers), so that clients see one shape whatever went wrong.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# HTTP status -> OpenAI's error type string.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "request_cancelled",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # seconds; sent as Retry-After (429, 503 when busy)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


def choice_error(index: int, message: str | None) -> dict[str, Any]:
    """The in-band error a stream sends when one of its choices fails mid-way."""
    return error_body(500, f"choice {index}: {message or 'request failed'}")


def short(value: object, limit: int = 80) -> str:
    """repr of a user-supplied value, cut so an error message never echoes a huge body."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
