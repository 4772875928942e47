"""Every error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

log = logging.getLogger("kvserve.server")

_TYPES = {500: "internal_server_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: APIError) -> Response:
    # json.dumps escapes non-ASCII, so even a lone surrogate echoed back encodes.
    body = json.dumps(error_body(error.status, error.message, error.param, error.code))
    return Response(body, status_code=error.status, headers=error.headers,
                    media_type="application/json")


def bad_request(exc: ValueError, fields: set[str], default_param: str | None) -> APIError:
    """A 400 from an engine or SamplingParams ValueError, whose message starts with the field."""
    message = str(exc)
    first_word = message.split(" ", 1)[0]  # a field, or a field's part ("a.b")
    is_field = first_word.split(".", 1)[0] in fields
    return APIError(400, message, first_word if is_field else default_param)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field like ``messages[0].role``."""
    first = exc.errors()[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the body is not valid JSON: {reason}")
    if not loc:
        return APIError(400, "the request body must be a JSON object, sent with "
                             "'Content-Type: application/json'")
    param = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unknown parameter: '{param}'. This server refuses a field it does "
                             f"not implement rather than ignore it.", param, "unknown_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    code = "unsupported_parameter" if first.get("type") == "unsupported_parameter" else None
    return APIError(400, f"{param} {message}" if code else f"{param}: {message}", param, code)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc))

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
