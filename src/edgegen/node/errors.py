"""The HTTP error boundary: every edgegen error becomes `{"error": "<message>"}` with its status.

The seed protocol and KServe v2 share that shape. Anything unexpected is logged with its traceback
and answered as a bare 500, so clients never see internals.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from edgegen.errors import (
    DeadlineExceeded,
    EdgegenError,
    ExecutorError,
    HeadersTooLarge,
    InvalidInput,
    InvalidName,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestError,
)

log = logging.getLogger("edgegen.errors")

# Most specific first: the first class the error is an instance of decides the status.
STATUS: tuple[tuple[type[EdgegenError], int], ...] = (
    (InvalidName, 404),
    (ModelNotFound, 404),
    (PayloadTooLarge, 413),
    (HeadersTooLarge, 431),
    (InvalidInput, 400),
    (RequestError, 400),
    (Overloaded, 503),
    (DeadlineExceeded, 504),
    (ExecutorError, 500),
)


def status_of(exc: EdgegenError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json", headers=headers
    )


def render(exc: EdgegenError) -> tuple[int, bytes, dict[str, str]]:
    """Status, JSON body and extra headers for an edgegen error; logs it once, at the right level."""
    status = status_of(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else {}
    if status >= 500:
        log.warning("request failed", extra={"status": status, "reason": exc.message})
    else:
        log.info("request refused", extra={"status": status, "reason": exc.message})
    return status, orjson.dumps({"error": exc.message}), headers


def _edgegen(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgegenError)
    status, body, headers = render(exc)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    log.info("request refused", extra={"status": 400, "reason": message})
    return error_response(message, 400)


def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "not found", 405: "method not allowed"}
    return error_response(messages.get(exc.status_code, str(exc.detail)), exc.status_code, exc.headers)


def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return error_response("internal error", 500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(EdgegenError, _edgegen)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
