"""The project's PKI, checked by real TLS handshakes: mutual TLS works with our certificates, and fails
with another CA's certificate or a revoked one."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edgegen.errors import ConfigError
from edgegen.security.pki import Pki, role_of


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    authority = Pki(tmp_path / "pki")
    authority.init()
    return authority


def server_context(pki: Pki, name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pki.root / f"{name}.crt", pki.root / f"{name}.key")
    context.load_verify_locations(pki.ca_cert_path)
    context.load_verify_locations(pki.crl_path)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str | None:
    """Connect over loopback; the peer role the server saw, or None if the handshake failed."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str | None] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                seen.append(role_of(x509.load_der_x509_certificate(der)) if der else None)
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            seen.append(None)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.recv(2)
    except (ssl.SSLError, OSError):
        pass
    thread.join(5)
    listener.close()
    return seen[0] if seen else None


def test_certificates_carry_their_role_and_the_ca_signed_them(pki: Pki) -> None:
    issued = pki.issue("edge-1", "node", hosts=("127.0.0.1", "edge-1.local"))
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert role_of(cert) == "node"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["edge-1.local"]
    for key in (issued.key, pki.ca_key_path):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_mutual_tls_with_our_certificates(pki: Pki) -> None:
    pki.issue("edge-1", "node")
    client = pki.issue("ops-laptop", "client", role="operator")
    role = handshake(server_context(pki, "edge-1"), client_context(pki.ca_cert_path, client.cert, client.key))
    assert role == "operator"


def test_a_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    pki.issue("edge-1", "node")
    other = Pki(tmp_path / "other")
    other.init("someone else's CA")
    stranger = other.issue("intruder", "client", role="admin")
    assert (
        handshake(
            server_context(pki, "edge-1"), client_context(pki.ca_cert_path, stranger.cert, stranger.key)
        )
        is None
    )


def test_a_revoked_certificate_is_refused(pki: Pki) -> None:
    pki.issue("edge-1", "node")
    client = pki.issue("old-laptop", "client")
    context = client_context(pki.ca_cert_path, client.cert, client.key)
    assert handshake(server_context(pki, "edge-1"), context) == "client"
    assert pki.revoke("old-laptop") == client.serial
    assert handshake(server_context(pki, "edge-1"), context) is None
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(client.serial) is not None


def test_pki_refusals(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        pki.init()
    with pytest.raises(ConfigError, match="pki init"):
        Pki(tmp_path / "empty").issue("x", "node")
    with pytest.raises(ConfigError, match="not a valid certificate name"):
        pki.issue("../evil", "node")
    pki.issue("edge-1", "node")
    with pytest.raises(ConfigError, match="already has a valid certificate"):
        pki.issue("edge-1", "node")
    with pytest.raises(ConfigError, match="no certificate"):
        pki.revoke("nobody")
    pki.revoke("edge-1")
    with pytest.raises(ConfigError, match="already revoked"):
        pki.revoke("edge-1")
    assert pki.issue("edge-1", "node").name == "edge-1"  # a revoked name may be issued again


def test_the_pki_commands(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "EDGEGEN_HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "edgegen", "pki", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    assert run("issue-node", "edge-1").returncode == 1  # no CA yet
    assert run("init").returncode == 0
    assert run("issue-node", "edge-1", "--host", "10.0.0.5", "--host", "edge-1.lan").returncode == 0
    assert run("issue-gateway", "gw").returncode == 0
    assert run("issue-client", "ops", "--role", "operator").returncode == 0
    refused = run("issue-client", "bad", "--role", "root")
    assert refused.returncode == 1
    assert "role must be one of" in refused.stderr
    assert run("revoke", "ops").returncode == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "edge-1.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["edge-1.lan"]
    assert role_of(x509.load_pem_x509_certificate((tmp_path / "pki" / "ops.crt").read_bytes())) == "operator"
