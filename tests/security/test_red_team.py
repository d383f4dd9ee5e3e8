"""Hostile callers against a real node (HTTPS, mutual TLS for admin calls) and gateway.

Each test is one attack; each asserts the refusal (status and JSON error) *and* that the fleet keeps
serving. Secrets never reach the logs (checked at the end of the module)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import openai
import pytest

from edgegen.executors import describe_model
from edgegen.security.audit import AuditLog
from edgegen.store import ModelStore
from tests.e2e.node_process import GatewayProcess, NodeProcess, running
from tests.llm_models import write_tiny_llama
from tests.security.conftest import JWT_SECRET, Fleet, SecureNode, error_of, make_jwt

SAMPLE = {"input_data": [0.0] * 64}
CHAT = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# Every route a node serves, with a body that would be valid: none of them may answer without a credential.
ROUTES = [
    ("POST", "/predict", SAMPLE),
    ("POST", "/models/digits/predict", SAMPLE),
    ("GET", "/v2", None),
    ("GET", "/v2/models/digits", None),
    ("GET", "/v2/models/digits/ready", None),
    ("POST", "/v2/models/digits/infer", {"inputs": []}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "tiny-llm", "prompt": "a", "max_tokens": 1}),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/admin/models", None),
    ("POST", "/admin/models/digits/activate", {"version": "2"}),
    ("GET", "/admin/audit", None),
    ("POST", "/metrics", None),  # public only for GET/HEAD
    ("DELETE", "/v2/health/live", None),
]


def call(node: SecureNode, method: str, path: str, body: object = None, **kw: object) -> httpx.Response:
    return httpx.request(method, f"{node.url}{path}", json=body, verify=node.verify, timeout=30, **kw)  # type: ignore[arg-type]


def still_serving(node: SecureNode, fleet: Fleet) -> None:
    response = call(node, "POST", "/predict", SAMPLE, headers=fleet.headers("user"))
    assert response.status_code == 200, response.text


def raw(port: int, data: bytes, context: ssl.SSLContext | None = None, wait: float = 5) -> bytes:
    """Bytes on the wire, as a hostile client sends them; the answer's first bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


# -- credentials -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_without_a_credential_is_401(
    node: SecureNode, method: str, path: str, body: object
) -> None:
    response = call(node, method, path, body)
    assert response.status_code == 401, response.text
    assert "credential" in error_of(response)
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_health_and_metrics_need_none(node: SecureNode) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert call(node, "GET", path).status_code == 200


@pytest.mark.parametrize(
    "token",
    ["eg_00000000_" + "A" * 43, "eg_zz", "not-a-token", "Bearer", "eg_" + "x" * 5000],
    ids=["unknown-key", "malformed-key", "garbage", "scheme-twice", "huge"],
)
def test_a_bad_key_is_401(node: SecureNode, token: str) -> None:
    response = call(node, "POST", "/predict", SAMPLE, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert error_of(response) in ("invalid API key", "invalid token: malformed")


def test_a_revoked_key_and_a_basic_credential_are_401(node: SecureNode, fleet: Fleet) -> None:
    assert call(node, "POST", "/predict", SAMPLE, headers=fleet.headers("revoked")).status_code == 401
    basic = {"Authorization": "Basic YWRtaW46YWRtaW4="}
    assert call(node, "POST", "/predict", SAMPLE, headers=basic).status_code == 401


# -- JWT ---------------------------------------------------------------------------------------------
def test_a_valid_jwt_works(node: SecureNode) -> None:
    response = call(node, "POST", "/predict", SAMPLE, headers={"Authorization": f"Bearer {make_jwt()}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: make_jwt(lifetime=-120), "expired"),
        (lambda: make_jwt(nbf=time.time() + 600), "not valid yet"),
        (lambda: make_jwt(aud="someone-else"), "wrong audience"),
        (lambda: make_jwt(role="root"), "role"),
        (
            lambda: jwt.encode(
                {"sub": "x", "role": "admin", "aud": "edgegen", "exp": time.time() + 60}, None, "none"
            ),
            "algorithm not allowed",
        ),
        (
            lambda: jwt.encode(
                {"sub": "x", "role": "admin", "aud": "edgegen", "exp": time.time() + 60},
                "another-secret" * 4,
                "HS256",
            ),
            "bad signature",
        ),
        (
            lambda: jwt.encode({"sub": "x", "role": "admin", "aud": "edgegen"}, JWT_SECRET, "HS256"),
            "claim is missing",
        ),
    ],
    ids=["expired", "not-yet-valid", "wrong-audience", "unknown-role", "alg-none", "re-signed", "no-exp"],
)
def test_a_bad_jwt_is_401(node: SecureNode, make: object, reason: str) -> None:
    token = make()  # type: ignore[operator]
    response = call(node, "POST", "/predict", SAMPLE, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, response.text
    assert reason in error_of(response)


def test_a_replayed_admin_jwt_is_refused(node: SecureNode, fleet: Fleet) -> None:
    token = make_jwt(role="admin", jti="once-only")
    with httpx.Client(verify=fleet.client_tls("ops"), timeout=30) as client:
        first = client.get(f"{node.url}/admin/models", headers={"Authorization": f"Bearer {token}"})
        again = client.get(f"{node.url}/admin/models", headers={"Authorization": f"Bearer {token}"})
    assert first.status_code == 200, first.text
    assert again.status_code == 401
    assert "already used" in error_of(again)


# -- roles, models, tenants ------------------------------------------------------------------------------
def test_a_user_key_may_not_call_admin_routes(node: SecureNode, fleet: Fleet) -> None:
    with httpx.Client(verify=fleet.client_tls("ops"), headers=fleet.headers("user"), timeout=30) as client:
        for path in ("/admin/models", "/admin/audit"):
            response = client.get(f"{node.url}{path}")
            assert response.status_code == 403, path
            assert "role" in error_of(response)


def test_an_operator_may_read_but_not_what_only_an_admin_may(node: SecureNode, fleet: Fleet) -> None:
    with httpx.Client(
        verify=fleet.client_tls("ops"), headers=fleet.headers("operator"), timeout=30
    ) as client:
        assert client.get(f"{node.url}/admin/models").status_code == 200


def test_admin_calls_need_an_admin_client_certificate(node: SecureNode, fleet: Fleet) -> None:
    """The right key is not enough over the network: the node wants the certificate of an admin role."""
    without = call(node, "GET", "/admin/models", headers=fleet.headers("admin"))
    assert without.status_code == 403
    assert "certificate" in error_of(without)
    with fleet.admin_client(cert="alice") as client:  # a valid certificate, of the user role
        assert client.get(f"{node.url}/admin/models").status_code == 403
    with fleet.admin_client() as client:
        assert client.get(f"{node.url}/admin/models").status_code == 200


@pytest.mark.parametrize("cert", ["other-ca", "revoked"])
def test_a_certificate_of_another_ca_or_a_revoked_one_fails_the_handshake(
    node: SecureNode, fleet: Fleet, cert: str
) -> None:
    context = fleet.client_tls()
    if cert == "other-ca":
        context.load_cert_chain(fleet.home / "other-ca" / "ops.crt", fleet.home / "other-ca" / "ops.key")
    else:
        context.load_cert_chain(fleet.pki / "revoked.crt", fleet.pki / "revoked.key")
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(f"{node.url}/admin/models", verify=context, headers=fleet.headers("admin"), timeout=10)
    still_serving(node, fleet)


def test_a_key_scoped_to_models_reaches_only_those(node: SecureNode, fleet: Fleet) -> None:
    digits_only, llm_only = fleet.headers("digits-only"), fleet.headers("llm-only")
    assert call(node, "POST", "/predict", SAMPLE, headers=digits_only).status_code == 200
    for method, path, body in [
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/v2/models/tiny-llm", None),
        ("POST", "/models/tiny-llm/predict", SAMPLE),
    ]:
        response = call(node, method, path, body, headers=digits_only)
        assert response.status_code == 403, path
        assert "may not use model 'tiny-llm'" in error_of(response)
    assert call(node, "POST", "/predict", SAMPLE, headers=llm_only).status_code == 403
    # a scoped key does not even learn which other models exist
    assert call(node, "GET", "/v2/models/no-such-model", headers=digits_only).status_code == 403
    listed = call(node, "GET", "/v1/models", headers=digits_only).json()["data"]
    assert listed == []
    assert [m["id"] for m in call(node, "GET", "/v1/models", headers=llm_only).json()["data"]] == ["tiny-llm"]


# -- paths and headers -------------------------------------------------------------------------------------
TRAVERSALS = [
    "/models/../predict",
    "/models/..%2f..%2fetc%2fpasswd/predict",
    "/models/..\\..\\etc/predict",
    "/models/%2e%2e%2fsecurity/predict",
    "/models/%252e%252e%252fetc/predict",
    "/models/digits%00/predict",
    "/models//etc/passwd/predict",
    "/v2/models/..%2fsecurity%2fkeys.sqlite",
    "/admin%2fmodels",
    "/v2/health/live/../../admin/models",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_in_model_names_is_refused(node: SecureNode, fleet: Fleet, path: str) -> None:
    context = fleet.client_tls("ops")
    request = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {fleet.keys['admin']}\r\n"
    answer = raw(node.port, (request + "Content-Length: 2\r\n\r\n{}").encode(), context)
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 403, 404, 405), answer[:200]
    still_serving(node, fleet)


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "localhost"},
        {"Host": "127.0.0.1:1/v2/health/live"},
        {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
        {"X-Original-URL": "/v2/health/live", "X-Rewrite-URL": "/v2/health/live"},
        {"X-Edgegen-Principal": '{"sub":"me","role":"admin","models":null,"tenant":null}'},
    ],
    ids=["host-localhost", "host-with-path", "forwarded-for", "original-url", "forged-principal"],
)
def test_crafted_headers_do_not_bypass_authentication(node: SecureNode, headers: dict[str, str]) -> None:
    assert call(node, "POST", "/predict", SAMPLE, headers=headers).status_code == 401
    assert call(node, "GET", "/admin/models", headers=headers).status_code == 401


def test_a_forged_principal_through_the_gateway_is_dropped(gateway: GatewayProcess, fleet: Fleet) -> None:
    forged = {"X-Edgegen-Principal": '{"sub":"me","role":"admin","models":null,"tenant":null}'}
    assert httpx.get(f"{gateway.url}/admin/models", headers=forged).status_code == 401
    user = {**forged, **fleet.headers("user")}
    assert httpx.get(f"{gateway.url}/admin/models", headers=user).status_code == 403


def test_the_gateway_vouches_for_its_callers_over_mutual_tls(gateway: GatewayProcess, fleet: Fleet) -> None:
    assert httpx.post(f"{gateway.url}/predict", json=SAMPLE, headers=fleet.headers("user")).status_code == 200
    assert httpx.get(f"{gateway.url}/admin/models", headers=fleet.headers("operator")).status_code == 200
    scoped = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=fleet.headers("digits-only"))
    assert scoped.status_code == 403


def test_the_openai_client_authenticates_with_its_api_key(gateway: GatewayProcess, fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=fleet.keys["llm-only"], max_retries=0)
    reply = client.chat.completions.create(
        model="tiny-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content is not None
    wrong = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="eg_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "hi"}])


# -- smuggling, sizes, floods ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "head",
    [
        "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 2\r\nContent-Length: 40\r\n",
        "Content-Length: -1\r\n",
    ],
    ids=["cl-and-te", "two-cl", "negative-cl"],
)
def test_smuggling_shapes_through_the_gateway_are_400(
    gateway: GatewayProcess, fleet: Fleet, head: str
) -> None:
    key = fleet.keys["user"]
    request = f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{head}\r\n{{}}"
    answer = raw(gateway.port, request.encode())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_oversized_bodies_headers_and_chunk_floods(
    gateway: GatewayProcess, node: SecureNode, fleet: Fleet
) -> None:
    headers = fleet.headers("user")
    big = httpx.post(f"{gateway.url}/predict", content=b"x" * (9 * 1024 * 1024), headers=headers)
    assert big.status_code == 413
    huge_header = {**headers, "X-Junk": "y" * 70_000}
    assert httpx.post(f"{gateway.url}/predict", json=SAMPLE, headers=huge_header).status_code == 431

    def flood() -> object:
        for _ in range(20_000):
            yield b"[" * 512

    chunked = httpx.post(
        f"{node.url}/predict", content=flood(), headers=headers, verify=node.verify, timeout=60
    )
    assert chunked.status_code == 413
    still_serving(node, fleet)


def test_slowloris_does_not_slow_a_normal_client(node: SecureNode, fleet: Fleet) -> None:
    """200 connections that trickle their headers: the node cuts them off after its head deadline
    (2 s here) and a normal client's latency does not move."""

    def latency() -> float:
        with httpx.Client(verify=node.verify, headers=fleet.headers("user")) as client:
            samples = []
            for _ in range(30):
                started = time.perf_counter()
                assert client.post(f"{node.url}/predict", json=SAMPLE).status_code == 200
                samples.append(time.perf_counter() - started)
            return sorted(samples)[len(samples) // 2]

    before = latency()
    context = fleet.client_tls()
    slow = []
    for _ in range(200):
        sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", node.port)), server_hostname="127.0.0.1"
        )
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        during = latency()
        time.sleep(2.5)
        for sock in slow:
            sock.settimeout(2)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                answer = sock.recv(200)
            except OSError:
                answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        for sock in slow:
            sock.close()
    assert during < max(3 * before, before + 0.02), (before, during)
    still_serving(node, fleet)


def test_a_body_that_trickles_is_cut_off_with_408(node: SecureNode, fleet: Fleet) -> None:
    context = fleet.client_tls()
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", node.port)), server_hostname="127.0.0.1"
    )
    with sock:
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {fleet.keys['user']}\r\n"
        sock.sendall((head + "Content-Length: 100\r\n\r\n{").encode())
        sock.settimeout(10)
        answer = sock.recv(500)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    still_serving(node, fleet)


def test_a_pushed_package_keeps_coming_past_the_body_deadline_but_may_not_stall(
    node: SecureNode, fleet: Fleet
) -> None:
    """A package's body may take longer than `body_timeout_s` (2 s here) while bytes keep arriving; one
    that stops for that long is cut off like any other body."""
    body = b"\x1f\x8b" + bytes(998)  # gzip's magic, then no archive: the store refuses it (422)
    head = (
        "PUT /admin/models/digits/package HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {fleet.keys['admin']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    answers = []
    for pieces, pause in ((10, 0.4), (1, 3.0)):  # 4 s of steady pieces; one piece, then 3 s of nothing
        context = fleet.client_tls("ops")
        with context.wrap_socket(
            socket.create_connection(("127.0.0.1", node.port)), server_hostname="127.0.0.1"
        ) as sock:
            sock.sendall(head)
            for start in range(0, pieces * 100, 100):
                sock.sendall(body[start : start + 100])
                time.sleep(pause)
            sock.settimeout(10)
            answers.append(sock.recv(500))
    assert answers[0].startswith(b"HTTP/1.1 422"), answers[0][:200]
    assert answers[1].startswith(b"HTTP/1.1 408"), answers[1][:200]
    still_serving(node, fleet)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # the point of the test
def test_the_node_speaks_no_tls_older_than_1_2(node: SecureNode, fleet: Fleet) -> None:
    context = fleet.client_tls()
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)), socket.create_connection(("127.0.0.1", node.port)) as sock:
        context.wrap_socket(sock, server_hostname="127.0.0.1")


# -- models ---------------------------------------------------------------------------------------------
def _activate(fleet: Fleet, node: SecureNode, version: str) -> httpx.Response:
    with fleet.admin_client() as client:
        return client.post(f"{node.url}/admin/models/digits/activate", json={"version": version})


def test_a_tampered_or_unsigned_package_is_refused_and_the_served_version_stays(
    node: SecureNode, fleet: Fleet, model_files: dict[str, Path]
) -> None:
    store = ModelStore(fleet.home / "models", describe=describe_model)
    tampered = store.add(model_files["onnx"], "digits", activate=False).version  # unsigned
    assert _activate(fleet, node, tampered).status_code == 422
    assert "not signed" in error_of(_activate(fleet, node, tampered))
    signed_dir = fleet.home / "models" / "digits" / "2"
    manifest = json.loads((signed_dir / "manifest.json").read_text())
    manifest["task"] = "something-else"  # content changed after signing
    (signed_dir / "manifest.json").write_text(json.dumps(manifest))
    refused = _activate(fleet, node, "2")
    assert refused.status_code == 422
    assert "signature does not match" in error_of(refused)
    with fleet.admin_client() as client:
        served = {m["name"]: m for m in client.get(f"{node.url}/admin/models").json()["models"]}
    assert served["digits"]["served"] == "1"
    still_serving(node, fleet)


@pytest.mark.parametrize("damage", ["truncated", "lying"])
def test_a_truncated_or_lying_gguf_is_refused_before_llama_cpp_sees_it(
    fleet: Fleet, tmp_path: Path, damage: str
) -> None:
    good = write_tiny_llama(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    else:  # a header that claims 2^40 tensors
        bad.write_bytes(good[:8] + (2**40).to_bytes(8, "little") + good[16:])
    result = subprocess.run(
        [sys.executable, "-m", "edgegen", "models", "add", str(bad), "--name", "evil"],
        env={"EDGEGEN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr


# -- abuse guard --------------------------------------------------------------------------------------------
def test_one_generation_at_a_time_per_key(fleet: Fleet) -> None:
    with running(SecureNode(fleet, EDGEGEN_SECURITY__MAX_STREAMS_PER_KEY="1")) as strict:
        llm = fleet.headers("llm-only")
        story = {"model": "tiny-llm", "prompt": "a long story", "max_tokens": 1900, "stream": True}
        story["temperature"] = 0  # greedy: this prompt then runs to max_tokens (no end-of-text)
        with httpx.Client(verify=strict.verify, headers=llm, timeout=60) as client:
            with client.stream("POST", f"{strict.url}/v1/completions", json=story) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: dropping the iterator would close the stream
                assert next(lines).startswith("data: ")  # the generation is running
                second = client.post(f"{strict.url}/v1/chat/completions", json=CHAT)
                assert second.status_code == 429
                assert "already runs 1 generations" in error_of(second)
                other = call(strict, "POST", "/v1/chat/completions", CHAT, headers=fleet.headers("admin"))
                assert other.status_code == 200  # another key has its own allowance
            # the client closed its stream: once the node has noticed, the slot is the key's again
            until = time.monotonic() + 5
            while (answer := client.post(f"{strict.url}/v1/chat/completions", json=CHAT)).status_code == 429:
                assert time.monotonic() < until, answer.text
                time.sleep(0.05)
            assert answer.status_code == 200


def test_rate_limits_and_a_ban(fleet: Fleet) -> None:
    """A node with tight limits: per key 429 + Retry-After; a burst of bad keys bans the address (403),
    which the audit log reports."""
    strict = SecureNode(
        fleet,
        EDGEGEN_SECURITY__RATE_PER_KEY="0.5",
        EDGEGEN_SECURITY__BURST_PER_KEY="3",
        EDGEGEN_SECURITY__BAN_AFTER_FAILURES="5",
        EDGEGEN_SECURITY__BAN_S="60",
        # This test's client is on loopback, which is spared by default (a trusted proxy, never banned).
        EDGEGEN_SECURITY__TRUSTED_PROXIES="[]",
        EDGEGEN_SECURITY__NEVER_BAN="[]",
    ).start()
    try:
        user = fleet.headers("user")
        codes = [call(strict, "POST", "/predict", SAMPLE, headers=user).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200]
        limited = call(strict, "POST", "/predict", SAMPLE, headers=user)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        # another key is not limited by the first one's bucket
        assert call(strict, "POST", "/predict", SAMPLE, headers=fleet.headers("admin")).status_code == 200
        for _ in range(5):
            bad = call(strict, "POST", "/predict", SAMPLE, headers={"Authorization": "Bearer eg_bad"})
            assert bad.status_code == 401
        banned = call(strict, "POST", "/predict", SAMPLE, headers=fleet.headers("operator"))
        assert banned.status_code == 403
        assert "banned" in error_of(banned)
        assert int(banned.headers["retry-after"]) > 30
        metrics = call(strict, "GET", "/metrics")
        assert metrics.status_code == 403  # a banned client is refused everything
    finally:
        strict.stop()
    audit = AuditLog(fleet.home / "security" / "audit.sqlite")
    actions = [entry.action for entry in audit.tail(200)]
    assert "client.banned" in actions
    assert audit.verify() is None


def test_secrets_never_reach_the_logs(node: SecureNode, gateway: GatewayProcess, fleet: Fleet) -> None:
    call(node, "POST", "/predict", SAMPLE, headers=fleet.headers("user"))
    call(node, "POST", "/predict", SAMPLE, headers={"Authorization": "Bearer eg_deadbeef_" + "Z" * 43})
    logs = node.log() + gateway.log()
    for key in fleet.keys.values():
        assert key[len("eg_12345678_") :] not in logs  # the secret (which may itself hold "_")
    assert "Z" * 43 not in logs
    assert JWT_SECRET not in logs


def test_admin_actions_are_in_the_audit_log(node: SecureNode, fleet: Fleet) -> None:
    with fleet.admin_client() as client:
        assert (
            client.post(f"{node.url}/admin/models/digits/activate", json={"version": "1"}).status_code == 200
        )
        entries = client.get(f"{node.url}/admin/audit", params={"limit": 500}).json()
    assert entries["chain_broken_at"] is None
    mine = [e for e in entries["entries"] if e["action"] == "POST /admin/models/digits/activate"]
    assert mine
    assert mine[-1]["actor"].startswith("key:")
    assert mine[-1]["outcome"] == "ok"


def test_a_fresh_node_says_how_to_make_the_first_admin_key(tmp_path: Path) -> None:
    fresh = NodeProcess(tmp_path, env={"EDGEGEN_SECURITY__AUTH": "true"})  # no key made for it
    with running(fresh):
        assert httpx.get(f"{fresh.url}/v2", timeout=5).status_code == 401
        lines = fresh.log()
    assert "no admin key yet; create the first one (shown once) with:" in lines
    # "EDGEGEN_HOME=… <python> -m edgegen keys create …": run what it says, the home as the environment
    command = next(line for line in lines.splitlines() if "keys create --role admin" in line).split()
    created = subprocess.run(
        command[1:],
        env={"EDGEGEN_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    key = created.stdout.strip()
    assert key.startswith("eg_")
    with running(NodeProcess(tmp_path, env={"EDGEGEN_SECURITY__AUTH": "true"})) as node:
        assert httpx.get(f"{node.url}/v2", headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_listening_beyond_loopback_without_tls_and_auth_refuses_to_start(
    tmp_path: Path, command: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgegen", command, "--host", "0.0.0.0", "--port", "0"],
        env={"EDGEGEN_HOME": str(tmp_path), "EDGEGEN_GATEWAY_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0 without TLS" in result.stderr


def test_the_gateway_serves_https_to_its_clients(fleet: Fleet, node: SecureNode) -> None:
    """The public listener on TLS (the gateway's certificate), in front of nodes on mutual TLS."""
    pki = fleet.pki
    config = fleet.home / "gateway-https.toml"
    config.write_text(
        f'[[nodes]]\nurl = "https://127.0.0.1:{node.port}"\n'
        f'[nodes_tls]\nca_file = "{pki / "ca.crt"}"\n'
        f'cert_file = "{pki / "gw.crt"}"\nkey_file = "{pki / "gw.key"}"\n'
        f'[tls]\ncert_file = "{pki / "gw.crt"}"\nkey_file = "{pki / "gw.key"}"\n'
    )
    front = GatewayProcess(fleet.home, "--config", str(config), auth=True)
    front.scheme, front.verify = "https", fleet.client_tls()
    user = fleet.headers("user")
    with running(front):
        answer = httpx.post(f"{front.url}/predict", json=SAMPLE, headers=user, verify=front.verify)
        assert answer.status_code == 200
        with pytest.raises(httpx.TransportError):  # no plain HTTP on the same port (reset or garbage)
            httpx.post(f"http://127.0.0.1:{front.port}/predict", json=SAMPLE, headers=user)
