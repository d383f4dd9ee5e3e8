"""Security settings shared by the node (`[security]`, `[tls]`) and the gateway (same sections).

[security]
auth = true                          # every route but health and metrics needs a credential
rate_per_key = 1000.0                # requests/s per credential (token bucket), burst twice that
allow_networks = ["10.0.0.0/8"]      # empty: every network
[security.jwt]
algorithm = "EdDSA"
public_key_file = "/etc/edgegen/idp.pub"
[tls]
cert_file = "node.crt"               # HTTPS (TLS ≥ 1.2)
key_file = "node.key"
client_ca_file = "ca.crt"            # mutual TLS: clients show a certificate of this CA
crl_file = "crl.pem"
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from edgegen.security.tokens import JwtSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# A DNS name as a Host header carries it, without a port: what `security.allowed_hosts` lists.
AllowedHost = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, max_length=253, pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$"
    ),
]
DAY_S = 86_400.0


class LocalOnly:
    """Field metadata for a setting that names a place beyond the process (a host, a URL). Such a
    setting, like every path and every secret (known by their types), is set in the operator's own file
    or environment on the machine, never by a remote change (node/remote_config.py)."""

    def __repr__(self) -> str:
        return "LocalOnly()"


LOCAL = LocalOnly()


def _url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a URL here is http(s)://host[:port][/path]")
    if "@" in parts.netloc:
        # A password in a URL would be shown wherever the URL is (settings, logs, the fleet view).
        raise ValueError(
            "a URL here carries no user name or password; credentials have settings of their own"
        )
    return url


HostName = Annotated[str, LOCAL]
Url = Annotated[str, AfterValidator(_url), LOCAL]


class SecuritySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    auth: bool = Field(True, description="require a credential on every route but health and metrics")
    keys_file: Path | None = Field(None, description="API key store (default: HOME/security/keys.sqlite)")
    audit_file: Path | None = Field(None, description="audit log (default: HOME/security/audit.sqlite)")
    jwt: JwtSettings | None = Field(None, description="accept JWT bearer tokens signed this way")
    # Defaults well above what one small node serves (~11,000 predictions/s on 2 cores): they stop a
    # runaway client, not a busy one. Set them to what each caller is entitled to.
    rate_per_key: float = Field(20_000.0, gt=0, le=1e9, description="requests/s one credential may make")
    burst_per_key: int = Field(40_000, ge=1, le=10**9)
    rate_per_client: float = Field(
        40_000.0, gt=0, le=1e9, description="requests/s one client address may make"
    )
    burst_per_client: int = Field(80_000, ge=1, le=10**9)
    max_streams_per_key: int = Field(
        16, ge=1, le=100_000, description="generations one credential may run at once"
    )
    allow_networks: list[Network] = Field(default_factory=list, description="empty: every network")
    deny_networks: list[Network] = Field(default_factory=list)
    ban_after_failures: int = Field(
        10, ge=1, le=10**9, description="failed authentications or probes before a ban"
    )
    ban_window_s: float = Field(60.0, gt=0, le=DAY_S)
    ban_s: float = Field(
        300.0, gt=0, le=30 * DAY_S, description="first ban; each later one of the client doubles"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a request's head must arrive within this"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=DAY_S, description="a request's body must arrive within this"
    )
    send_timeout_s: float = Field(
        60.0,
        gt=0,
        le=DAY_S,
        description="a client that takes none of its answer for this long is cut off (nginx's send_timeout)",
    )
    signed_models: Literal["auto", "required", "off"] = Field(
        "auto",
        description="serve only packages a trusted key signed; auto: as soon as this machine has a "
        "signing key (HOME/security/signing.pub) or trusted_signers names one",
    )
    trusted_signers: list[Path] = Field(default_factory=list, description="Ed25519 public keys (PEM)")
    encryption_key_file: Path | None = Field(
        None,
        description="AES-256 keys (id:base64 a line, the first encrypts) for data at rest; without it, "
        "EDGEGEN_ENCRYPTION_KEYS if set; with neither, nothing is encrypted",
    )
    model_sources: list[Url] = Field(
        default_factory=list,
        description="URL prefixes a node may pull model packages from (POST /admin/models/{name}/pull); "
        "empty: pulling by URL is off",
    )
    model_sources_ca: Path | None = Field(
        None, description="CA bundle for the sources (default: the system's)"
    )
    max_pull_bytes: int = Field(
        16 << 30, ge=1024, le=1 << 40, description="largest package a pull may download"
    )
    insecure: bool = Field(
        False, description="allow listening beyond loopback without TLS and auth (never in production)"
    )
    # Who a failure counts against (security/gate.py): a proxy's address stands for all of its clients.
    trusted_proxies: list[Network] = Field(
        default_factory=lambda: list(LOOPBACK_NETWORKS),
        description="peers (besides a gateway certificate over mutual TLS) whose X-Forwarded-For, its last "
        "address, names the client that failures, bans and per-client rate limits count against; never "
        "banned themselves. Default: loopback, where the documented fleet's gateway calls its nodes from",
    )
    never_ban: list[Network] = Field(
        default_factory=lambda: list(LOOPBACK_NETWORKS),
        description="clients never counted towards a ban, fail2ban's ignoreip. Default: loopback",
    )
    allowed_hosts: list[AllowedHost] = Field(
        default_factory=list,
        description="names this server is reached by, besides addresses, localhost and the machine's own "
        "name: the Host an admin change (and, with auth off, any request) must carry",
    )
    metrics_auth: Literal["public", "key"] = Field(
        "public", description="GET /metrics: public, or for an operator's credential (key)"
    )
    metrics_model_names: bool = Field(
        False, description="show model names in a public /metrics (an operator's credential always sees them)"
    )


class TlsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cert_file: Path | None = Field(None, description="this server's certificate (PEM): serve HTTPS")
    key_file: Path | None = None
    client_ca_file: Path | None = Field(None, description="mutual TLS: accept client certificates of this CA")
    client_certs: Literal["optional", "required"] = Field(
        "required", description="with client_ca_file: must every client show a certificate?"
    )
    crl_file: Path | None = Field(None, description="revoked certificates (the CA's crl.pem)")

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("mutual TLS (client_ca_file) needs cert_file and key_file")
        if self.crl_file is not None and self.client_ca_file is None:
            raise ValueError("crl_file checks client certificates: it needs client_ca_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


def exposure_problem(host: str, security: SecuritySettings, tls: TlsSettings) -> str | None:
    """Why listening on `host` with these settings is unsafe, or None. Loopback is always fine."""
    if host in LOOPBACK_HOSTS or security.insecure:
        return None
    missing = [what for what, ok in (("TLS", tls.enabled), ("authentication", security.auth)) if not ok]
    if not missing:
        return None
    return (
        f"refusing to listen on {host} without {' and '.join(missing)}: set [tls] cert_file/key_file"
        " and keep security.auth on, or pass --insecure if this network is trusted"
    )
