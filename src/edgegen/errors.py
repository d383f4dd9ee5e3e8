"""The one exception hierarchy of edgegen, its one table of HTTP statuses, and the error bodies on the wire.

Every layer raises these; the CLI prints their message on one line, and every HTTP answer that tells of
one (a route's, the security gate's, the gateway's) takes its status from `status_of` and its body from
`error_body`: the seed's and KServe v2's `{"error": "..."}`, or OpenAI's object under `/v1/`. They sit
here, below every layer that answers requests, so that no layer imports one above it to say "no".
Messages are written for the client or operator: they never carry a traceback, a file-system path or an
internal name.

    EdgegenError
    ├── ConfigError             a setting is invalid; the message says how to fix it
    ├── StoreError              the model store refused an operation
    │   ├── InvalidName         a model name or version breaks the naming rule
    │   ├── ModelNotFound       no such model or version
    │   ├── VersionExists       adding a version that is already there
    │   └── IntegrityError      a manifest is malformed or a file's sha256 differs
    ├── ExecutorError           a model failed to load or to run
    ├── RequestError            the client sent something we will not process (4xx)
    │   ├── InvalidInput        shape, dtype, NaN/Inf, malformed JSON
    │   ├── PayloadTooLarge     body over the configured limit
    │   ├── HeadersTooLarge     request headers over the configured limit
    │   ├── ClientGone          the client disconnected before its answer was ready
    │   ├── Unprocessable       well-formed, but cannot be done as asked (422)
    │   ├── NotFound            nothing by that name: a node, a file (404)
    │   ├── Conflict            an idempotency key reused for another request, a fleet change that cannot
    │   │                       be made (409)
    │   ├── Unauthorized        no credential, or one that authenticates nobody (401)
    │   └── Forbidden           a credential that may not do this (403)
    ├── Overloaded              the model's queue is full; retry after `retry_after` seconds
    │   └── Unloaded            the model version asked was closed (a newer one serves, or none)
    ├── DeadlineExceeded        the request waited longer than its deadline
    └── UpstreamError           a server we called (a node, for the gateway) did not answer, or answered
                                what we cannot use (502)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson


class EdgegenError(Exception):
    """Base of every error edgegen raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(EdgegenError):
    pass


class StoreError(EdgegenError):
    pass


class InvalidName(StoreError):
    pass


class ModelNotFound(StoreError):
    pass


class VersionExists(StoreError):
    pass


class IntegrityError(StoreError):
    pass


class ExecutorError(EdgegenError):
    pass


class RequestError(EdgegenError):
    pass


class InvalidInput(RequestError):
    """`param`: the request field at fault, where there is one (OpenAI's error shape names it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PayloadTooLarge(RequestError):
    pass


class HeadersTooLarge(RequestError):
    pass


class ClientGone(RequestError):
    pass


class Unprocessable(RequestError):
    pass


class NotFound(RequestError):
    pass


class Conflict(RequestError):
    pass


class Unauthorized(RequestError):
    pass


class Forbidden(RequestError):
    pass


class Overloaded(EdgegenError):
    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unloaded(Overloaded):
    """The version a request was given to was closed before it took the request: replaced by another
    version (which the service then asks instead), removed, or the node stops."""


class DeadlineExceeded(EdgegenError):
    pass


class UpstreamError(EdgegenError):
    pass


# Most specific first: the first class the error is an instance of decides the status.
STATUS: tuple[tuple[type[EdgegenError], int], ...] = (
    (ClientGone, 499),  # nginx's "client closed request": nobody reads it, the logs and metrics do
    (Unauthorized, 401),
    (Forbidden, 403),
    (Unprocessable, 422),
    (NotFound, 404),
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
    (UpstreamError, 502),
    (ExecutorError, 500),
)

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def status_of(exc: EdgegenError) -> int:
    """The HTTP status that tells of `exc`.

    >>> status_of(ModelNotFound("no model 'x'"))
    404
    """
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def is_openai(path: str) -> bool:
    """Whether an error on `path` is told in OpenAI's shape."""
    return path.startswith("/v1/")


def error_body(message: str, status: int, openai: bool, param: str | None = None) -> bytes:
    """`{"error": "..."}` (seed, KServe v2) or OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    if not openai:
        return orjson.dumps({"error": message})
    kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    code = "model_not_found" if status == 404 else None
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def validation_message(
    errors: Sequence[Mapping[str, Any]], at: Iterable[str] = (), skip: Iterable[str] = ()
) -> str:
    """The first of pydantic's validation `errors` as one line, "where: what": its place under `at`,
    without the location parts named in `skip` (FastAPI's leading "body").

    >>> validation_message([{"loc": ("body", "max_tokens"), "msg": "Input should be > 0"}], skip=["body"])
    'max_tokens: Input should be > 0'
    """
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    dropped = set(skip)
    where = ".".join(str(part) for part in (*at, *first["loc"]) if part not in dropped)
    return f"{where}: {first['msg']}" if where else str(first["msg"])
