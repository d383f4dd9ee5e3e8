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
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from edgegen.errors import (
    ClientGone,
    Conflict,
    DeadlineExceeded,
    EdgegenError,
    ExecutorError,
    Forbidden,
    HeadersTooLarge,
    IntegrityError,
    InvalidInput,
    InvalidName,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    StoreError,
    Unauthorized,
    Unprocessable,
    VersionExists,
)

log = logging.getLogger("edgegen.errors")

# Most specific first: the first class the error is an instance of decides the status.
STATUS: tuple[tuple[type[EdgegenError], int], ...] = (
    (ClientGone, 499),  # nginx's "client closed request": nobody reads it, the logs and metrics do
    (Unauthorized, 401),
    (Forbidden, 403),
    (Unprocessable, 422),
    (Conflict, 409),
    (IntegrityError, 422),  # a package that fails its hashes or signature, named in a request
    (InvalidName, 404),
    (ModelNotFound, 404),
    (VersionExists, 409),
    (StoreError, 422),  # the store refused a package a request named or sent (a broken archive, …)
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


OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(message: str, status: int, openai: bool) -> bytes:
    """`{"error": "..."}` (seed, KServe v2) or OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    if not openai:
        return orjson.dumps({"error": message})
    kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    code = "model_not_found" if status == 404 else None
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


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
    return status, error_body(exc.message, status, openai), headers


def error_response(
    message: str, status: int, headers: dict[str, str] | None = None, openai: bool = False
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
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
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
