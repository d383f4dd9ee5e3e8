"""KServe v2 over gRPC (`inference.GRPCInferenceService`, Triton's protocol) in front of an ASGI app: a
node's (node/grpc_server.py) or a gateway's (gateway/grpc_relay.py).

Every call goes the way an HTTP request goes, through the same objects of the same process: it becomes
the request its HTTP twin would be (`ModelInfer` of `digits` is `POST /v2/models/digits/infer`, with the
call's metadata as headers and its peer as the client) and enters the app's stack at the top. So the
request boundary counts and logs it, and the security gate decides on it as it decides on the twin (the
Bearer token in the metadata, networks, bans, rate limits, roles, model scopes, and over mutual TLS the
client certificate's subject). What the twin carries and how its answer becomes the reply is each
method's (`Rpc`): a node runs the call's handler past the gate with no body at all; a gateway builds the
twin's body and relays it to a node like any other request.

    client ─gRPC─▶ GrpcServer ─ASGI─▶ RequestBoundary ─▶ SecurityGate ─▶ the app
                       ◀── reply ── (an HTTP status: its gRPC code, the message of its JSON body)

Limits: a message over `max_body_bytes` is refused by gRPC itself (RESOURCE_EXHAUSTED), metadata over
`max_header_bytes` likewise. Headers of the answer (a request id, Retry-After, the response cache's) come
back as trailing metadata.

TLS is the server's own (`[tls]`). With `client_certs = "required"` every connection shows a certificate
of `client_ca_file`, and since gRPC has no revocation check of its own, the CA's list (`crl_file`) is
checked here against each call's certificate. With "optional", gRPC asks for none (grpcio can require a
certificate or not ask for one, nothing between): a certificate only ever widens admin calls and a
gateway's forwarding over HTTPS, and every gRPC call is a user's, which needs its key either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, unquote

import grpc
import orjson
from starlette.types import ASGIApp, Message, Scope

from edgegen.errors import ConfigError, EdgegenError, InvalidInput, status_of
from edgegen.http.grpc_messages import SERVICE, message
from edgegen.security.settings import TlsSettings
from edgegen.security.transport import Revocations, pem_subject_name

log = logging.getLogger("edgegen.grpc")
GRPC = "edgegen.grpc"  # the scope key that marks a gRPC call; no HTTP request can set a scope key
# The gRPC code of each HTTP status an answer may carry (any other: INTERNAL).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Where each datatype's values sit in typed contents; FP16 and BF16 have none (raw contents only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Answer headers that are the HTTP exchange's own, not news for a gRPC client.
_NOT_RELAYED = frozenset(
    {b"content-type", b"content-length", b"date", b"server", b"connection"}
    | {b"inference-header-content-length"}
)


class GrpcSettings(Protocol):
    """What a server with a gRPC port reads from its settings (a node's or a gateway's)."""

    @property
    def host(self) -> str: ...
    @property
    def grpc_port(self) -> int: ...
    @property
    def max_body_bytes(self) -> int: ...
    @property
    def max_header_bytes(self) -> int: ...
    @property
    def tls(self) -> TlsSettings: ...


@dataclass
class Twin:
    """The HTTP request a call stands for: method, path (decoded and raw), body and its headers, and what
    else the app reads from the scope."""

    method: str
    path: str
    raw_path: str
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    scope: dict[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    """What the app answered the twin."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def ok(self) -> Answer:
        """This answer, when it is a success; else the refusal it tells of."""
        if self.status != 200:
            raise Refusal(self.status, error_message(self.body))
        return self


class Refusal(Exception):
    """A call refused with the gRPC code of HTTP `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Rpc:
    """One method of the service: its messages (named without the package), its twin from the request
    (and the deadline the client left, in seconds), and its reply from the request, twin and answer."""

    request: str
    response: str
    twin: Callable[[Any, float | None], Twin]
    reply: Callable[[Any, Twin, Answer], Any]


def model_path(name: str, version: str, tail: str) -> tuple[str, str]:
    """The path (decoded, and raw) of a model route of the HTTP protocol; the name and version are
    percent-encoded in the raw one, so the gate reads them exactly as it reads an HTTP client's.

    >>> model_path("digits", "", "/infer")
    ('/v2/models/digits/infer', '/v2/models/digits/infer')
    """
    decoded = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + tail
    raw = f"/v2/models/{quote(name, safe='')}" + (f"/versions/{quote(version, safe='')}" if version else "")
    return decoded, raw + tail


def typed_values(tensor: Any) -> Any:
    """The values of an input given as typed contents, from the one field its datatype names."""
    given = [f.name for f, _ in tensor.contents.ListFields()]
    where = CONTENTS.get(tensor.datatype)
    if where is None:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} values go in raw_input_contents")
    if any(g != where for g in given):
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} values go in contents.{where}")
    return getattr(tensor.contents, where)


def check_raw(request: Any) -> bool:
    """Whether a `ModelInferRequest` gives its inputs as raw contents: then one entry for each, and no
    typed contents beside them."""
    raw = request.raw_input_contents
    if not raw:
        return False
    if len(raw) != len(request.inputs):
        raise InvalidInput("raw_input_contents must hold one entry for each input, in order")
    for tensor in request.inputs:
        if tensor.contents.ListFields():
            raise InvalidInput(f"input {tensor.name!r}: give raw_input_contents or contents, not both")
    return True


Route = Callable[[Any], tuple[str, str]]  # a request message -> the (decoded, raw) path of its twin


def fixed_path(path: str) -> Route:
    return lambda request: (path, path)


def model_route(tail: str) -> Route:
    """The path of a request naming a model (`name`, `version`) with `tail` after it."""
    return lambda request: model_path(request.name, request.version, tail)


def statistics_path(request: Any) -> tuple[str, str]:
    """The path of a `ModelStatisticsRequest`: one model's, or (no name) every model's."""
    return model_path(request.name, request.version, "/stats") if request.name else ("/v2/models/stats",) * 2


def infer_path(request: Any) -> tuple[str, str]:
    return model_path(request.model_name, request.model_version, "/infer")


def peer_address(peer: str) -> tuple[str, int]:
    """gRPC's name of a peer as an ASGI client: ("", 0) for a Unix socket.

    >>> peer_address("ipv4:127.0.0.1:50051"), peer_address("ipv6:%5B::1%5D:7000")
    (('127.0.0.1', 50051), ('::1', 7000))
    """
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return "", 0
    host, _, port = unquote(rest).rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def error_message(body: bytes) -> str:
    """The message of an error body, `{"error": "..."}` (anything else: "internal error")."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "internal error"
    return error if isinstance(error, str) else "internal error"


class GrpcServer:
    """The gRPC server of one process, over the app's ASGI `entry` (its whole stack)."""

    def __init__(self, settings: GrpcSettings, entry: ASGIApp, rpcs: Mapping[str, Rpc]) -> None:
        self.settings = settings
        self.entry = entry
        tls = settings.tls
        self.tls = tls.enabled
        self.revoked = Revocations(tls.crl_file) if tls.crl_file is not None else None
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.max_metadata_size", settings.max_header_bytes),
                ("grpc.so_reuseport", 1),  # every worker process listens on the port
            ]
        )
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._unary(name, rpc),
                request_deserializer=message(rpc.request).FromString,
                response_serializer=message(rpc.response).SerializeToString,
            )
            for name, rpc in rpcs.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        host, port = settings.host, settings.grpc_port
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if tls.enabled:
                self.server.add_secure_port(address, _credentials(tls))
            else:
                self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio's way of saying the port cannot be had
            raise ConfigError(f"cannot listen for gRPC on {address}: is grpc_port in use?") from None

    async def start(self) -> None:
        await self.server.start()
        log.info("grpc serving", extra={"port": self.settings.grpc_port, "tls": self.tls})

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)

    def _unary(
        self, name: str, rpc: Rpc
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        route = f"/{SERVICE}/{name}"

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                twin = rpc.twin(request, context.time_remaining())
                scope = self._scope(context, twin, route)
                answer = await self._run(scope, twin.body)
                trailing = [(k.decode(), v.decode()) for k, v in answer.headers if k not in _NOT_RELAYED]
                if trailing:
                    context.set_trailing_metadata(tuple(trailing))
                return rpc.reply(request, twin, answer)
            except Refusal as refused:
                code, reason = CODES.get(refused.status, grpc.StatusCode.INTERNAL), refused.message
            except EdgegenError as exc:  # a twin that cannot be built says why, as the app would
                code, reason = CODES.get(status_of(exc), grpc.StatusCode.INTERNAL), exc.message
            except Exception:  # a fault of ours (an answer the reply cannot read): INTERNAL, and logged
                log.exception("gRPC call failed", extra={"rpc": name})
                code, reason = grpc.StatusCode.INTERNAL, "internal error"
            await context.abort(code, reason)

        return unary

    def _scope(self, context: grpc.aio.ServicerContext[Any, Any], twin: Twin, route: str) -> Scope:
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in context.invocation_metadata() or ()
            if isinstance(v, str) and not k.startswith(":")
        ]
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "2",
            "scheme": "https" if self.tls else "http",
            "method": twin.method,
            "path": twin.path,
            "raw_path": twin.raw_path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers + twin.headers,
            "client": peer_address(context.peer()),
            "server": (self.settings.host, self.settings.grpc_port),
            "edgegen.route": route,
            GRPC: route,
            **twin.scope,
        }
        if self.tls:
            pem = next(iter(context.auth_context().get("x509_pem_cert", ())), b"")
            if pem and self.revoked is not None and self.revoked.revoked(pem):
                log.info("grpc call refused", extra={"rpc": route, "reason": "revoked certificate"})
                raise Refusal(401, "this client certificate is revoked")
            scope["extensions"] = {"tls": {"client_cert_name": pem_subject_name(pem) if pem else None}}
        return scope

    async def _run(self, scope: Scope, body: bytes) -> Answer:
        answer = Answer(500, [], b"")
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:  # the body went whole: what a relay reads next is the client going away, never
                await asyncio.get_running_loop().create_future()  # (gRPC cancels the call instead)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                answer.body += message.get("body", b"")

        await self.entry(scope, receive, send)
        return answer


def _credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """The server's certificate; with `client_ca_file` and `client_certs = "required"`, certificates of
    that CA required (module docstring: "optional" asks for none)."""
    assert tls.cert_file is not None
    assert tls.key_file is not None
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    required = tls.client_ca_file is not None and tls.client_certs == "required"
    ca = tls.client_ca_file.read_bytes() if required and tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=required)
