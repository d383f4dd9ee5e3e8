"""KServe v2 over gRPC (`inference.GRPCInferenceService`, Triton's protocol), on a node's `grpc_port`.

Every call goes the way an HTTP request goes, through the same objects of the same process: it becomes
the request its HTTP twin would be (`ModelInfer` of `digits` is `POST /v2/models/digits/infer`, with the
call's metadata as headers and its peer as the client) and enters the node's ASGI stack at the top. So
the request boundary counts and logs it, the security gate decides on it as it decides on the twin (the
Bearer token in the metadata, networks, bans, rate limits, roles, model scopes, and over mutual TLS the
client certificate's subject), and only then does `GrpcCalls`, in front of the routes, run its handler:
the same service, batcher, cache and limits the HTTP routes use (node/v2.py's validation included).

    client ─gRPC─▶ GrpcServer ─ASGI scope─▶ RequestBoundary ─▶ SecurityGate ─▶ GrpcCalls ─▶ handler
                       ◀── status ── (an HTTP status, mapped to a gRPC code; the message from the body)

Limits: a message over `max_body_bytes` is refused by gRPC itself (RESOURCE_EXHAUSTED), metadata over
`max_header_bytes` likewise; a call's deadline bounds its wait (DEADLINE_EXCEEDED) as `request_timeout_s`
does. Outputs go back as raw contents, as Triton sends them; inputs come as raw or typed contents.
TLS is the node's own (`[tls]`). With `client_certs = "required"` every connection shows a certificate
of `client_ca_file`, and since gRPC has no revocation check of its own, the CA's list (`crl_file`) is
checked here against each call's certificate. With "optional", gRPC asks for none (grpcio can require a
certificate or not ask for one, nothing between): a certificate only ever widens admin calls and a
gateway's forwarding over HTTPS, and every gRPC call is a user's, which needs its key either way.

Not served: the streaming call (`ModelStreamInfer`), the model repository, shared memory, trace and
log settings; gRPC answers them UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgegen.engine.service import caller_of
from edgegen.errors import ConfigError, EdgegenError, InvalidInput, ModelNotFound
from edgegen.http.errors import render
from edgegen.node import v2
from edgegen.node.grpc_messages import SERVICE, message
from edgegen.node.state import NodeState
from edgegen.security.auth import principal_of
from edgegen.security.transport import Revocations, pem_subject_name

if TYPE_CHECKING:
    from edgegen.config import Settings

log = logging.getLogger("edgegen.grpc")
CALL = "edgegen.grpc"  # the scope key of a gRPC call; no HTTP request can set a scope key
Handler = Callable[[NodeState, Scope, Any], Awaitable[Any]]
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


@dataclass(eq=False)
class GrpcCall:
    """One call on its way through the node's stack: its handler and request, and what it answers."""

    rpc: str  # the method's name, e.g. "ModelInfer"
    handler: Handler
    request: Any
    deadline_s: float | None  # what the client's deadline leaves, when it set one
    response: Any = None
    metadata: dict[str, str] = field(default_factory=dict)  # trailing metadata (the cache's headers)


class GrpcCalls:
    """In front of a node's routes: a scope that carries a gRPC call runs its handler; any other goes on.

    An edgegen error becomes its HTTP status and JSON body, exactly as the routes answer it (http/errors.py);
    the server maps the status to a gRPC code."""

    def __init__(self, app: ASGIApp, node: NodeState) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call: GrpcCall | None = scope.get(CALL)
        if call is None:
            await self.app(scope, receive, send)
            return
        status, body = 200, b""
        headers: dict[str, str] = {}
        try:
            async with asyncio.timeout(call.deadline_s):
                call.response = await call.handler(self.node, scope, call.request)
        except EdgegenError as exc:
            status, body, headers = render(exc)
        except TimeoutError:
            status, body = 504, orjson.dumps({"error": "the call's deadline passed"})
        except Exception:
            log.exception("unhandled error", extra={"rpc": call.rpc})
            status, body = 500, orjson.dumps({"error": "internal error"})
        call.metadata.update(headers)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


# -- the handlers: each gets the node, the call's scope (its principal, its caller) and its request ---------


async def _live(node: NodeState, scope: Scope, request: Any) -> Any:
    return message("ServerLiveResponse")(live=True)


async def _ready(node: NodeState, scope: Scope, request: Any) -> Any:
    return message("ServerReadyResponse")(ready=node.registry.ready)


async def _model_ready(node: NodeState, scope: Scope, request: Any) -> Any:
    # Triton answers "not ready" for a model it does not serve, rather than an error.
    try:
        v2.served_model(node, scope, request.name, request.version or None)
    except ModelNotFound:
        return message("ModelReadyResponse")(ready=False)
    return message("ModelReadyResponse")(ready=True)


async def _server_metadata(node: NodeState, scope: Scope, request: Any) -> Any:
    return json_format.ParseDict(
        v2.server_description(principal_of(scope)), message("ServerMetadataResponse")()
    )


async def _model_metadata(node: NodeState, scope: Scope, request: Any) -> Any:
    served = v2.served_model(node, scope, request.name, request.version or None)
    return json_format.ParseDict(v2.metadata(node, served.manifest), message("ModelMetadataResponse")())


async def _model_config(node: NodeState, scope: Scope, request: Any) -> Any:
    served = v2.served_model(node, scope, request.name, request.version or None)
    config = json_format.ParseDict(v2.configuration(served), message("ModelConfig")())
    return message("ModelConfigResponse")(config=config)


async def _model_statistics(node: NodeState, scope: Scope, request: Any) -> Any:
    if request.name:
        served = v2.served_model(node, scope, request.name, request.version or None)
        stats = {"model_stats": [v2.statistics(served)]}
    else:
        stats = v2.every_statistics(node, principal_of(scope))
    return json_format.ParseDict(stats, message("ModelStatisticsResponse")())


def _feeds(request: Any, specs: dict[str, Any]) -> dict[str, np.ndarray]:
    """A `ModelInferRequest`'s inputs, checked as node/v2.py checks the HTTP protocol's."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput("raw_input_contents must hold one entry for each input, in order")
    feeds: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name, shape, dtype = v2.input_spec(tensor.name, list(tensor.shape), tensor.datatype, specs)
        if name in feeds:
            raise InvalidInput(f"input {name!r} is given twice")
        given = [f.name for f, _ in tensor.contents.ListFields()]
        if raw:
            if given:
                raise InvalidInput(f"input {name!r}: give raw_input_contents or contents, not both")
            feeds[name] = v2.from_bytes(name, raw[i], dtype, shape)
            continue
        where = CONTENTS.get(tensor.datatype)
        if where is None:
            raise InvalidInput(f"input {name!r}: {tensor.datatype} values go in raw_input_contents")
        if any(g != where for g in given):
            raise InvalidInput(f"input {name!r}: {tensor.datatype} values go in contents.{where}")
        feeds[name] = v2.from_values(name, list(getattr(tensor.contents, where)), dtype, shape)
    v2.check_feeds(feeds, specs)
    return feeds


async def _model_infer(node: NodeState, scope: Scope, request: Any) -> Any:
    served = v2.served_model(node, scope, request.model_name, request.model_version or None)
    served.fixed_shape()
    manifest = served.manifest
    feeds = _feeds(request, {s.name: s for s in manifest.inputs})
    names = [o.name for o in manifest.outputs]
    wanted = [o.name for o in request.outputs] or names
    if unknown := [n for n in wanted if n not in names]:
        raise InvalidInput(f"unknown outputs {unknown}; the model's outputs are {names}")
    outputs, headers = await node.service.predict(caller_of(scope), served, feeds)
    scope[CALL].metadata.update(headers)
    response = message("ModelInferResponse")(
        model_name=manifest.name, model_version=manifest.version, id=request.id
    )
    for name in wanted:
        array = outputs[name]
        response.outputs.add(name=name, datatype=v2.NUMPY_TYPES[array.dtype.name], shape=array.shape)
        response.raw_output_contents.append(
            np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        )
    return response


def _model_path(name: str, version: str, tail: str) -> tuple[str, str]:
    """The path (decoded, and raw) of a model route of the HTTP protocol; the name and version are
    percent-encoded in the raw one, so the gate reads them exactly as it reads an HTTP client's."""
    decoded = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + tail
    raw = f"/v2/models/{quote(name, safe='')}" + (f"/versions/{quote(version, safe='')}" if version else "")
    return decoded, raw + tail


Route = Callable[[Any], tuple[str, str]]  # a request -> the (decoded, raw) path of its HTTP twin


@dataclass(frozen=True)
class Rpc:
    """One method of the service: its messages (named without the package), its HTTP twin's method and
    path, and its handler."""

    request: str
    response: str
    method: str
    route: Route
    handler: Handler


def _fixed(path: str) -> Route:
    return lambda request: (path, path)


def _model(tail: str) -> Route:
    return lambda request: _model_path(request.name, request.version, tail)


def _statistics_route(request: Any) -> tuple[str, str]:
    return _model_path(request.name, request.version, "/stats") if request.name else ("/v2/models/stats",) * 2


RPCS = {
    "ServerLive": Rpc("ServerLiveRequest", "ServerLiveResponse", "GET", _fixed("/v2/health/live"), _live),
    "ServerReady": Rpc(
        "ServerReadyRequest", "ServerReadyResponse", "GET", _fixed("/v2/health/ready"), _ready
    ),
    "ModelReady": Rpc("ModelReadyRequest", "ModelReadyResponse", "GET", _model("/ready"), _model_ready),
    "ServerMetadata": Rpc(
        "ServerMetadataRequest", "ServerMetadataResponse", "GET", _fixed("/v2"), _server_metadata
    ),
    "ModelMetadata": Rpc("ModelMetadataRequest", "ModelMetadataResponse", "GET", _model(""), _model_metadata),
    "ModelConfig": Rpc("ModelConfigRequest", "ModelConfigResponse", "GET", _model("/config"), _model_config),
    "ModelStatistics": Rpc(
        "ModelStatisticsRequest", "ModelStatisticsResponse", "GET", _statistics_route, _model_statistics
    ),
    "ModelInfer": Rpc(
        "ModelInferRequest",
        "ModelInferResponse",
        "POST",
        lambda request: _model_path(request.model_name, request.model_version, "/infer"),
        _model_infer,
    ),
}


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
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class GrpcServer:
    """The gRPC server of one node process, over the node's ASGI `entry` (its whole stack)."""

    def __init__(self, settings: Settings, entry: ASGIApp) -> None:
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
                ("grpc.so_reuseport", 1),  # every worker process of the node listens on the port
            ]
        )
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._unary(name, rpc),
                request_deserializer=message(rpc.request).FromString,
                response_serializer=message(rpc.response).SerializeToString,
            )
            for name, rpc in RPCS.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        host = settings.host
        address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
        try:
            if tls.enabled:
                self.server.add_secure_port(address, _credentials(settings))
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
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            path, raw = rpc.route(request)
            call = GrpcCall(name, rpc.handler, request, context.time_remaining())
            scope = self._scope(context, call, rpc.method, path, raw)
            if isinstance(scope, str):
                log.info("grpc call refused", extra={"rpc": name, "reason": scope})
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, scope)
            status, body = await self._run(scope)
            if call.metadata:
                context.set_trailing_metadata(tuple((k.lower(), v) for k, v in call.metadata.items()))
            if status != 200:
                await context.abort(CODES.get(status, grpc.StatusCode.INTERNAL), _message(body))
            return call.response

        return unary

    def _scope(
        self, context: grpc.aio.ServicerContext[Any, Any], call: GrpcCall, method: str, path: str, raw: str
    ) -> Scope | str:
        """The ASGI scope of the call's HTTP twin, or why its client certificate is refused."""
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
            "method": method,
            "path": path,
            "raw_path": raw.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": peer_address(context.peer()),
            "server": (self.settings.host, self.settings.grpc_port),
            "edgegen.route": f"/{SERVICE}/{call.rpc}",
            CALL: call,
        }
        if self.tls:
            pem = next(iter(context.auth_context().get("x509_pem_cert", ())), b"")
            if pem and self.revoked is not None and self.revoked.revoked(pem):
                return "this client certificate is revoked"
            scope["extensions"] = {"tls": {"client_cert_name": pem_subject_name(pem) if pem else None}}
        return scope

    async def _run(self, scope: Scope) -> tuple[int, bytes]:
        status, body = 500, b""

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(sent: Message) -> None:
            nonlocal status, body
            if sent["type"] == "http.response.start":
                status = sent["status"]
            elif sent["type"] == "http.response.body":
                body += sent.get("body", b"")

        await self.entry(scope, receive, send)
        return status, body


def _message(body: bytes) -> str:
    """The message of an error body: `{"error": "..."}`."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "internal error"
    return error if isinstance(error, str) else "internal error"


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    """The node's certificate; with `client_ca_file` and `client_certs = "required"`, certificates of that
    CA required (module docstring: "optional" asks for none)."""
    tls = settings.tls
    assert tls.cert_file is not None
    assert tls.key_file is not None
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    required = tls.client_ca_file is not None and tls.client_certs == "required"
    ca = tls.client_ca_file.read_bytes() if required and tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=required)
