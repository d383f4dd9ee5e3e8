"""TLS, as a node and a gateway speak it (the connection that carries it is http/serving.py's).

- `server_context(tls)`: HTTPS with TLS ≥ 1.2; with `client_ca_file`, mutual TLS (client
  certificates of our CA, required or optional) and the CA's revocation list checked.
- `client_context(...)`: what a gateway uses to call nodes: verifies the node against our CA and
  shows its own certificate.
- `subject_name(cert)`: a verified peer certificate's subject, from which the security gate reads the
  caller's role; `pem_subject_name(pem)` the same of a certificate in PEM (what gRPC gives).
- `Revocations(crl_file)`: whether a certificate is on the CA's revocation list, for a server whose TLS
  cannot check it itself (gRPC's).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from edgegen.memo import Memo
from edgegen.security.settings import TlsSettings

_SHORT = {"commonName": "CN", "organizationalUnitName": "OU", "organizationName": "O"}


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    assert tls.cert_file is not None
    assert tls.key_file is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(["http/1.1"])
    if tls.client_ca_file is not None:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.client_certs == "required" else ssl.CERT_OPTIONAL
        if tls.crl_file is not None:
            context.load_verify_locations(tls.crl_file)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def subject_name(cert: dict[str, Any]) -> str:
    """A peer certificate's subject as `CN=…,OU=…,O=…` (RFC 4514 order: most specific first).

    >>> subject_name({"subject": ((("organizationalUnitName", "gateway"),), (("commonName", "gw1"),))})
    'CN=gw1,OU=gateway'
    """
    parts = [f"{_SHORT.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(reversed(parts))


def pem_subject_name(pem: bytes) -> str:
    """`subject_name` of a certificate in PEM: the same string, so the gate reads both alike."""
    from cryptography import x509

    subject = x509.load_pem_x509_certificate(pem).subject
    parts = [f"{a.rfc4514_attribute_name}={a.value!s}" for rdn in subject.rdns for a in rdn]
    return ",".join(reversed(parts))


class Revocations:
    """The serial numbers on a CA's revocation list (`crl_file`, PEM), read once, as the HTTPS context
    reads it at start-up; the answer for each certificate seen is kept (bounded)."""

    def __init__(self, crl_file: Path) -> None:
        from cryptography import x509

        crl = x509.load_pem_x509_crl(crl_file.read_bytes())
        self._serials = {entry.serial_number for entry in crl}
        self._seen: Memo[bytes, bool] = Memo(10_000)

    def revoked(self, pem: bytes) -> bool:
        known = self._seen.get(pem)
        if known is None:
            from cryptography import x509

            known = x509.load_pem_x509_certificate(pem).serial_number in self._serials
            self._seen.remember(pem, known)
        return known
