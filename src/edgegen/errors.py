"""The one exception hierarchy of edgegen.

Every layer raises these; the HTTP edge maps them to each protocol's error shape in one place
(`edgegen.http.errors`), and the CLI prints their message on one line. Messages are written for the
client or operator: they never carry a traceback, a file-system path or an internal name.

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
    │   ├── Conflict            an idempotency key reused for another request (409)
    │   ├── Unauthorized        no credential, or one that authenticates nobody (401)
    │   └── Forbidden           a credential that may not do this (403)
    ├── Overloaded              the model's queue is full; retry after `retry_after` seconds
    └── DeadlineExceeded        the request waited longer than its deadline
"""


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
    pass


class PayloadTooLarge(RequestError):
    pass


class HeadersTooLarge(RequestError):
    pass


class ClientGone(RequestError):
    pass


class Unprocessable(RequestError):
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


class DeadlineExceeded(EdgegenError):
    pass
