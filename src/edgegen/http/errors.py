"""The HTTP error boundary of the FastAPI apps: every edgegen error becomes its answer (status from
`edgegen.errors.status_of`, body from `error_body`), logged once at the right level; a request that fails
validation names its first problem; anything unexpected is logged with its traceback and answered as a
bare 500, so clients never see internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from edgegen.errors import (
    ClientGone,
    EdgegenError,
    InvalidInput,
    Overloaded,
    error_body,
    is_openai,
    status_of,
    validation_message,
)

log = logging.getLogger("edgegen.errors")


def render(exc: EdgegenError, openai: bool = False) -> tuple[int, bytes, dict[str, str]]:
    """Status, JSON body and extra headers for an edgegen error; logs it once, at the right level.

    A full queue is 503 for the fixed-shape protocols (Triton's convention) and 429 for OpenAI's.
    """
    status = status_of(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after)
        if openai:
            status = 429
    if status >= 500:
        log.warning("request failed", extra={"status": status, "reason": exc.message})
    else:
        log.info("request refused", extra={"status": status, "reason": exc.message})
    param = exc.param if isinstance(exc, InvalidInput) else None
    return status, error_body(exc.message, status, openai, param), headers


def error_response(
    message: str, status: int, headers: Mapping[str, str] | None = None, openai: bool = False
) -> Response:
    return Response(
        error_body(message, status, openai),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _edgegen(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgegenError)
    status, body, headers = render(exc, is_openai(request.url.path))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _disconnected(request: Request, exc: Exception) -> Response:
    """The client went away while its body was read (or was cut off for sending it too slowly)."""
    assert isinstance(exc, ClientDisconnect)
    return _edgegen(request, ClientGone("the client disconnected before its request arrived whole"))


def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message = validation_message(exc.errors(), skip=("body",))
    log.info("request refused", extra={"status": 400, "reason": message})
    return error_response(message, 400, openai=is_openai(request.url.path))


def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "not found", 405: "method not allowed"}
    message = messages.get(exc.status_code, str(exc.detail))
    return error_response(message, exc.status_code, exc.headers, openai=is_openai(request.url.path))


def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return error_response("internal error", 500, openai=is_openai(request.url.path))


def install(app: FastAPI) -> None:
    app.add_exception_handler(EdgegenError, _edgegen)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
