"""The project's own PKI: a CA that issues node, gateway and client certificates, and revokes them.

    <home>/pki/ca.crt, ca.key            the CA (ECDSA P-256, 10 years); ca.key is 0600
    <home>/pki/<name>.crt, <name>.key    one certificate per device, signed by the CA
    <home>/pki/crl.pem                   the revocation list, signed by the CA, rewritten on every revoke
    <home>/pki/index.json                name → serial, role, revoked

A certificate carries its role in the subject's organizational unit (`node`, `gateway`, `client`, or
a user role for a client certificate) and the matching extended key usage: a node certificate serves
TLS, a client one authenticates to a server, a gateway does both (it serves clients and calls nodes).
ECDSA P-256 rather than Ed25519: every TLS stack a fleet meets accepts it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgegen.errors import ConfigError

Kind = Literal["node", "gateway", "client"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
CA_DAYS, CERT_DAYS = 3650, 365
# A CA signs certificates and revocation lists, nothing else.
CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


class _Entry(TypedDict):
    """One certificate in index.json."""

    serial: int
    kind: Kind
    role: str
    revoked: bool


@dataclass(frozen=True)
class Issued:
    name: str
    role: str
    serial: int
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_cert_path, self.ca_key_path = root / "ca.crt", root / "ca.key"
        self.crl_path, self.index_path = root / "crl.pem", root / "index.json"

    # -- the CA ------------------------------------------------------------------------------------------
    def init(self, common_name: str = "edgegen CA") -> Path:
        if self.ca_key_path.exists():
            raise ConfigError(f"a CA already exists in {self.root}; remove it first to start over")
        self.root.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(self.ca_key_path, key)
        self.ca_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._save_index({})
        self._write_crl([])
        return self.ca_cert_path

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.ca_key_path.exists():
            raise ConfigError(f"no CA in {self.root}; run `edgegen pki init` first")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    # -- certificates ------------------------------------------------------------------------------------
    def issue(
        self,
        name: str,
        kind: Kind,
        *,
        role: str | None = None,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> Issued:
        """A key and certificate for `name`; `role` (client certificates) defaults to the kind."""
        if not _NAME.match(name) or name == "ca":
            raise ConfigError(f"{name!r} is not a valid certificate name (lowercase letters, digits, . -)")
        index = self._load_index()
        if name in index and not index[name]["revoked"]:
            raise ConfigError(f"{name} already has a valid certificate; revoke it before issuing another")
        ca_cert, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        role = role or kind
        usages = {
            # (a node is a client when it ships its logs to the gateway with this certificate)
            "node": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            "gateway": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
        }[kind]
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            ]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )  # fmt: skip
        if kind != "client":
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = self.root / f"{name}.crt", self.root / f"{name}.key"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        index[name] = {"serial": cert.serial_number, "kind": kind, "role": role, "revoked": False}
        self._save_index(index)
        return Issued(name, role, cert.serial_number, cert_path, key_path)

    def revoke(self, name: str) -> int:
        index = self._load_index()
        entry = index.get(name)
        if entry is None:
            raise ConfigError(f"no certificate named {name!r}")
        if entry["revoked"]:
            raise ConfigError(f"{name}'s certificate is already revoked")
        entry["revoked"] = True
        self._save_index(index)
        self._write_crl([e["serial"] for e in index.values() if e["revoked"]])
        return entry["serial"]

    def _write_crl(self, serials: list[int]) -> None:
        ca_cert, ca_key = self._ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=30))
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        self.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def _load_index(self) -> dict[str, _Entry]:
        if not self.index_path.exists():
            return {}
        data: dict[str, _Entry] = json.loads(self.index_path.read_text())
        return data

    def _save_index(self, index: dict[str, _Entry]) -> None:
        self.index_path.write_text(json.dumps(index, indent=1, sort_keys=True))


def role_of(cert: x509.Certificate) -> str | None:
    """The role a certificate of ours carries (its subject's organizational unit)."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if units else None
