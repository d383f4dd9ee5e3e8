"""The seams between the gateway and its nodes, attacked through a real gateway (issue 14: 2, 3, 10, 11, 13).

The fleet is the documented one (docs/operations.md): a node on loopback with authentication off, a
gateway that authenticates every caller in front of it — so whatever the gateway lets through, the
node serves. Where a real node cannot be made to misbehave on demand (answer 500 to one request every
time, drop a connection as a crashing node does, redirect with its own address), a stub node stands in
for it; the gateway under test is always the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgegen.executors import describe_model
from edgegen.security.keys import KeyStore
from edgegen.store import ModelStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, metric, running
from tests.llm_models import write_tiny_llama
from tests.security.conftest import Fleet, security_env

RUNNING = 'edgegen_sequences{model="tiny-llm",state="running"}'
GENERATED = 'edgegen_generated_tokens_total{model="tiny-llm"}'
MAX_TOKENS = 1900  # a generation that runs for many seconds unless it is cancelled


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> object:
        return json.loads(self.body)["error"]


def raw_get(port: int, target: str, headers: dict[str, str] | None = None, host: str | None = None) -> Answer:
    """`GET target` as bytes on the wire (an HTTP client would normalize the targets these tests need)."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
    return Answer(int(status_line.split(" ", 2)[1]), parsed, body)


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    until = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


def fleet_view(gateway: GatewayProcess, headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    view = httpx.get(f"{gateway.url}/gateway/fleet", headers=headers, timeout=10).json()
    return {n["name"]: n for n in view["nodes"]}


class StubNode:
    """A node's HTTP surface, scripted: ready; `POST /v1/jobs` answers 500 with a JSON error (what a
    request's content can make a node do); any other POST drops its connection unanswered (a node
    crashing); `GET /v1/moved` redirects to its own address. It counts the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        stub = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: Any, client_address: Any) -> bool:
                stub.connections += 1
                return True

        self.server = Server(("127.0.0.1", 0), _StubHandler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubNode:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a stub has nothing to say on the test's stderr

    def _answer(self, status: int, body: bytes, *extra: tuple[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v2/health/ready":
            self._answer(200, b'{"ready": true}')
        elif self.path.startswith("/v1/stray/"):
            # Its answer, then, in the same write, an answer nobody asked for: a node (or whoever holds
            # its port) trying to be the answer to the next request on this kept-alive connection.
            n = self.path.rsplit("/", 1)[1]
            own = json.dumps({"n": n}).encode()
            stray = b'{"n": "stolen"}'
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(own), own, len(stray), stray)
            )
        elif self.path == "/v1/moved":
            own = f"http://127.0.0.1:{self.server.server_address[1]}/v1/models"
            self._answer(307, b"{}", ("Location", own))
        else:
            self._answer(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/v1/jobs":
            self._answer(500, b'{"error": "internal error"}')
        else:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def gateway_for(
    home: Path, urls: dict[str, str], env: dict[str, str] | None = None, *, auth: bool = False
) -> Iterator[GatewayProcess]:
    """A gateway in front of the named node URLs; authentication off unless `auth`."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "gateway.toml"
    config.write_text(
        "".join(f'[[nodes]]\nurl = "{url}"\nname = "{name}"\n' for name, url in urls.items())
        + "[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nstatus_interval_s = 0.5\n"
    )
    with running(GatewayProcess(home, "--config", str(config), env=env, auth=auth)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def open_node(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[NodeProcess]:
    """A node as the documented fleet runs it: loopback, plain HTTP, authentication off."""
    home = tmp_path_factory.mktemp("open-node")
    store = ModelStore(home / "models", describe=describe_model)
    store.add(model_files["onnx"], "digits")
    store.add(write_tiny_llama(home / "tiny.gguf"), "tiny-llm", task="text-generation")
    with running(NodeProcess(home, env={**LLM_ENV, "EDGEGEN_STORE_POLL_S": "0"})) as node:
        yield node


@pytest.fixture(scope="module")
def front(
    tmp_path_factory: pytest.TempPathFactory, fleet: Fleet, open_node: NodeProcess
) -> Iterator[GatewayProcess]:
    """The gateway in front of `open_node`: authentication on, the fleet's keys."""
    env = {
        **security_env(fleet, "EDGEGEN_GATEWAY_"),
        "EDGEGEN_GATEWAY_SECURITY__BAN_AFTER_FAILURES": "100000",  # this module probes on purpose
    }
    with gateway_for(tmp_path_factory.mktemp("front"), {"open": open_node.url}, env, auth=True) as gateway:
        yield gateway


# -- 2: a user key reaches no admin route, however the path is spelled ---------------------------------
def test_the_fleet_shape_leaves_admin_routes_to_the_gateway(
    front: GatewayProcess, open_node: NodeProcess, fleet: Fleet
) -> None:
    """What the bypasses below aim at: the node serves admin routes to anyone; the gateway does not."""
    assert httpx.get(f"{open_node.url}/admin/models").status_code == 200
    assert httpx.get(f"{front.url}/admin/models", headers=fleet.headers("user")).status_code == 403
    assert httpx.get(f"{front.url}/admin/models", headers=fleet.headers("operator")).status_code == 200
    assert httpx.get(f"{front.url}/v1/models", headers=fleet.headers("user")).status_code == 200


ADMIN_BYPASSES = [
    "/v1/.%2e/admin/models",
    "/v1/%2e./admin/models",
    "/v1/%2e%2e/admin/models",
    "/v1/%2E%2E/admin/models",
    "/v1/..%2fadmin/models",
    "/v1/..%2Fadmin/models",
    "/v1/..%5cadmin/models",
    "/v1/%2e%2e%2fadmin/models",
    "/v1/%252e%252e/admin/models",
    "/v1/./.%2e/admin/models",
    "/predict/.%2e/admin/models",
    "/v2/health/live/.%2e/.%2e/.%2e/admin/models",
    "/v1/.%2e/gateway/fleet",
    "//127.0.0.1:{port}/admin/models",
]


@pytest.mark.parametrize("target", ADMIN_BYPASSES)
def test_a_user_key_reaches_no_admin_route_through_the_gateway(
    front: GatewayProcess, open_node: NodeProcess, fleet: Fleet, target: str
) -> None:
    answer = raw_get(front.port, target.format(port=open_node.port), fleet.headers("user"))
    assert answer.status == 400, answer
    assert "request path" in str(answer.error()) or "request target" in str(answer.error())


def test_a_decoded_scan_path_counts_as_a_probe_at_the_gateway(front: GatewayProcess, fleet: Fleet) -> None:
    """`/%2eenv` is `/.env` once decoded: the gate's scan check sees the decoded path too."""
    probes = 'edgegen_security_refusals_total{reason="probe"}'
    before = metric(front, probes)
    answer = raw_get(front.port, "/%2eenv", fleet.headers("user"))
    assert answer.status == 404
    assert metric(front, probes) == before + 1


# -- 3: no request target makes the gateway connect anywhere but to its nodes ---------------------------
@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("//127.0.0.1:{port}/anything", 400),
        ("//127.0.0.1:{port}", 400),
        ("/%2f127.0.0.1:{port}/anything", 400),
        ("http://127.0.0.1:{port}/v1/models", 200),  # absolute form: its path goes to the node
        ("/v1/models?next=//127.0.0.1:{port}/x", 200),  # a query is a query
    ],
)
def test_a_request_target_cannot_send_the_gateway_elsewhere(
    front: GatewayProcess, fleet: Fleet, target: str, status: int
) -> None:
    with StubNode() as elsewhere:
        answer = raw_get(front.port, target.format(port=elsewhere.port), fleet.headers("user"))
        assert answer.status == status, answer
        assert elsewhere.connections == 0  # never connected: the credential never left for it


def test_a_target_naming_no_host_is_400_and_the_node_is_released(front: GatewayProcess, fleet: Fleet) -> None:
    answer = raw_get(front.port, "//nohost/x", fleet.headers("user"))
    assert answer.status == 400, answer
    assert fleet_view(front, fleet.headers("operator"))["open"]["in_flight"] == 0


# -- 10: a client that leaves cancels its generation on the node ----------------------------------------
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_leaves_stops_its_generation_on_the_node(
    front: GatewayProcess, open_node: NodeProcess, fleet: Fleet, stream: bool
) -> None:
    body = {"model": "tiny-llm", "prompt": "a long story", "max_tokens": MAX_TOKENS, "stream": stream,
            "temperature": 0}  # fmt: skip
    url, user = f"{front.url}/v1/completions", fleet.headers("user")
    before = metric(open_node, GENERATED)
    if stream:
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", url, json=body, headers=user) as response,
        ):
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, headers=user, timeout=0.5)
    assert wait_for(lambda: metric(open_node, RUNNING) == 0, 3), "the node still generates for nobody"
    assert metric(open_node, GENERATED) - before < MAX_TOKENS
    operator = fleet.headers("operator")
    assert wait_for(lambda: fleet_view(front, operator)["open"]["in_flight"] == 0, 3)


# -- 11: only a node's own failure ejects it ------------------------------------------------------------
def test_an_answer_that_a_request_caused_ejects_no_node(tmp_path: Path, open_node: NodeProcess) -> None:
    job = {"method": "POST", "url": "/predict", "body": {"input_data": [0.0] * 64}}
    with StubNode() as stub, gateway_for(tmp_path, {"stub": stub.url, "open": open_node.url}) as gateway:
        statuses = [httpx.post(f"{gateway.url}/v1/jobs", json=job, timeout=30).status_code for _ in range(10)]
        assert statuses.count(500) >= 3  # the stub answered each of its share with a 500
        view = fleet_view(gateway)
    assert view["stub"]["ejections"] == 0, view["stub"]
    assert view["open"]["ejections"] == 0


def test_a_node_that_drops_its_requests_is_still_ejected(tmp_path: Path, open_node: NodeProcess) -> None:
    body = {"model": "tiny-llm", "prompt": "a", "max_tokens": 1}
    with StubNode() as stub, gateway_for(tmp_path, {"stub": stub.url, "open": open_node.url}) as gateway:

        def ejected() -> bool:
            httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
            return bool(fleet_view(gateway)["stub"]["ejections"])

        assert wait_for(ejected, 10)
        assert fleet_view(gateway)["stub"]["in_flight"] == 0


# -- 13: no redirect names a host the client chose, or a node's address ---------------------------------
def test_a_trailing_slash_is_no_redirect_built_from_the_host(
    front: GatewayProcess, open_node: NodeProcess, fleet: Fleet
) -> None:
    """Starlette's slash redirect wrote the request's Host into an absolute Location: the client's choice
    on a node, the node's own address through the gateway. There is none now: a trailing slash is 404."""
    direct = raw_get(open_node.port, "/v1/models/")
    assert (direct.status, direct.headers.get("location")) == (404, None)
    through = raw_get(front.port, "/v1/models/", fleet.headers("user"))
    assert (through.status, through.headers.get("location")) == (404, None)
    own = raw_get(front.port, "/gateway/fleet/", fleet.headers("operator"))
    assert (own.status, own.headers.get("location")) == (404, None)


def test_a_nodes_redirect_is_relayed_without_its_address(tmp_path: Path) -> None:
    with StubNode() as stub, gateway_for(tmp_path, {"stub": stub.url}) as gateway:
        answer = raw_get(gateway.port, "/v1/moved")
    assert answer.status == 307
    assert answer.headers["location"] == "/v1/models"


def test_an_answer_nobody_asked_for_is_never_the_next_clients(tmp_path: Path) -> None:
    """The relay's client (gateway/upstream.py) keeps connections to a node alive: bytes a node sends
    beyond its answer must not become part of that answer, nor the answer to the next request."""
    with (
        StubNode() as stub,
        gateway_for(tmp_path, {"stub": stub.url}) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        answers = [client.get(f"/v1/stray/{i}") for i in range(8)]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"n": str(i)}) for i in range(8)]
    assert stub.connections >= 2  # a connection that carried a stray answer is never reused


def test_a_relayed_answer_carries_one_date(front: GatewayProcess, fleet: Fleet) -> None:
    """The gateway's server writes its own Date: the node's is not relayed beside it."""
    answer = httpx.get(f"{front.url}/v1/models", headers=fleet.headers("user"))
    assert answer.status_code == 200
    assert len(answer.headers.get_list("date")) == 1
    assert answer.headers["x-edgegen-node"] == "open"


# -- issue 19: a fleet shared by gateway workers ---------------------------------------------------------
def test_with_workers_no_worker_takes_a_fleet_change_it_must_refuse(tmp_path: Path) -> None:
    """Each worker has its own gate and writes what it accepts to the fleet they share: a change refused
    (no key, a user's key, a hostile value) is refused by whichever worker takes it, and reaches none."""
    with StubNode() as stub:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[[nodes]]\nurl = "{stub.url}"\nname = "stub"\n[health]\ninterval_s = 0.2\n')
        gateway = GatewayProcess(tmp_path, "--config", str(config), "--workers", "2", auth=True)
        with running(gateway):
            keys = KeyStore(tmp_path / "security" / "keys.sqlite")
            try:
                user = {"Authorization": f"Bearer {keys.create('user', label='tests')[0]}"}
            finally:
                keys.close()
            admin = gateway.headers
            attempts = [
                ("PATCH", "/gateway/nodes/stub", {"draining": True}, {}),
                ("PATCH", "/gateway/nodes/stub", {"draining": True}, user),
                ("PATCH", "/gateway/nodes/stub", {"weight": "x"}, admin),
                ("PATCH", "/gateway/nodes/stub", {"weight": 10**9}, admin),
                ("POST", "/gateway/nodes", {"url": "file:///etc/passwd"}, admin),
                ("POST", "/gateway/nodes", {"url": stub.url}, admin),
            ]
            refused = [
                httpx.request(method, f"{gateway.url}{path}", json=body, headers=headers).status_code
                for _ in range(12)  # fresh connections: both workers take some
                for method, path, body, headers in attempts
            ]
            time.sleep(0.5)  # (more than a sync: anything written would have reached every worker)
            views = [fleet_view(gateway, gateway.headers) for _ in range(12)]
    assert set(refused[0::6]) == {401}
    assert set(refused[1::6]) == {403}
    assert set(refused[2::6]) | set(refused[3::6]) | set(refused[4::6]) <= {400, 422}
    assert set(refused[5::6]) == {409}  # its URL is in the fleet already, whichever worker is asked
    assert all(list(v) == ["stub"] and not v["stub"]["draining"] and v["stub"]["weight"] == 1 for v in views)


# -- the gateway's sync routes, in threads beside the relay's event loop -------------------------------------
def test_an_operator_polling_the_fleet_under_load_is_never_answered_500(
    front: GatewayProcess, fleet: Fleet
) -> None:
    """`GET /gateway/fleet`, its history, `/gateway/alerts` and `/metrics` run in threads while the event
    loop relays: they read what the loop changes (each node's recent tries, its history, the alerts, who
    takes traffic). Reading a deque or dict as it changed answered 500. Here 2,560 predictions, 32 at a
    time, go through the gateway while an operator polls all four: every poll and prediction gets 200."""
    statuses: list[int] = []
    done = threading.Event()

    async def load() -> None:
        try:
            async with httpx.AsyncClient(base_url=front.url, headers=fleet.headers("user"), timeout=30) as c:
                for _ in range(80):
                    body = {"input_data": [[0.5] * 64]}
                    answers = await asyncio.gather(*(c.post("/predict", json=body) for _ in range(32)))
                    statuses.extend(a.status_code for a in answers)
        finally:
            done.set()

    relaying = threading.Thread(target=asyncio.run, args=(load(),))
    relaying.start()
    polls: list[tuple[str, int]] = []
    try:
        with httpx.Client(base_url=front.url, headers=fleet.headers("operator"), timeout=30) as operator:
            while not done.is_set():
                for path in ("/gateway/fleet", "/gateway/fleet/history", "/gateway/alerts", "/metrics"):
                    polls.append((path, operator.get(path).status_code))
    finally:
        relaying.join()
    assert [p for p in polls if p[1] != 200] == []
    assert len(polls) >= 100
    assert statuses == [200] * 2_560
