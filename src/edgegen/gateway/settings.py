"""Typed gateway settings, read once at start-up (TOML file, then `EDGEGEN_GATEWAY_*` variables).

port = 8080
[[nodes]]
url = "http://127.0.0.1:8001"
weight = 1
[balancer]
default = "least_connections"
routes = { "/v1/chat/completions" = "prefix_affinity" }   # by path prefix, longest wins
models = { "digits" = "p2c_ewma" }                         # by model name, before routes
[health]
interval_s = 2.0
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from edgegen.config import EnvFirstSettings, GatewayTracingSettings, default_home, read_toml, settings_error
from edgegen.security.settings import DAY_S, HostName, SecuritySettings, TlsSettings

BalancerName = Literal[
    "round_robin", "weighted_round_robin", "least_connections", "p2c_ewma", "prefix_affinity"
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NodeEntry(_Section):
    url: str = Field(description="the node's base URL: http://host:port")
    weight: int = Field(1, ge=1, le=1000)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="default: node-<n>")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("a node URL is http(s)://host:port, without path, query or fragment")
        if parts.query or parts.fragment:
            raise ValueError("a node URL is http(s)://host:port, without path, query or fragment")
        if "@" in parts.netloc:
            # The URL is shown in the fleet view and the logs; the gateway authenticates to nodes with
            # its certificate (nodes_tls) or nodes_key, never with a password in a URL.
            raise ValueError("a node URL carries no user name or password (see nodes_tls and nodes_key)")
        return url.rstrip("/")


class BalancerSettings(_Section):
    default: BalancerName = "least_connections"
    routes: dict[str, BalancerName] = Field(default_factory=dict, description="path prefix → balancer")
    models: dict[str, BalancerName] = Field(default_factory=dict, description="model name → balancer")


class HealthSettings(_Section):
    """Active checks: GET /v2/health/ready on every node."""

    interval_s: float = Field(2.0, gt=0, le=3600)
    timeout_s: float = Field(1.0, gt=0, le=3600)
    healthy_after: int = Field(1, ge=1, le=1000, description="consecutive passes that bring a node back")
    unhealthy_after: int = Field(2, ge=1, le=1000, description="consecutive failures that take a node out")
    status_interval_s: float = Field(
        5.0, gt=0, le=3600, description="how often each node's GET /admin/status is read for the fleet view"
    )
    history_s: float = Field(
        3600.0,
        ge=0,
        le=7 * DAY_S,
        description="the fleet view's traffic kept per node, sampled every status_interval_s",
    )


class OutlierSettings(_Section):
    """Passive ejection: a node whose requests keep failing is taken out, for longer each time."""

    consecutive_failures: int = Field(3, ge=1, le=1000)
    base_ejection_s: float = Field(5.0, gt=0, le=DAY_S)
    max_ejection_s: float = Field(300.0, gt=0, le=DAY_S)
    max_ejected_share: float = Field(0.5, gt=0, le=1, description="never eject more of the fleet than this")


class RetrySettings(_Section):
    attempts: int = Field(3, ge=1, le=10, description="tries of one request, the first included")
    budget_ratio: float = Field(0.2, ge=0, le=1, description="retries allowed per request, on average")
    budget_min: float = Field(10.0, ge=0, le=1e6, description="retries always available (a quiet gateway)")


class LogStoreSettings(_Section):
    """The fleet's logs, shipped by the nodes (`[logs] ship_to` on a node): kept and searchable here."""

    path: Path | None = Field(None, description="SQLite file (default: HOME/logs/fleet.sqlite)")
    retention_s: float = Field(
        7 * 86_400.0, gt=0, le=366 * DAY_S, description="lines older than this are dropped"
    )
    max_batch: int = Field(10_000, ge=1, le=1_000_000, description="lines one POST /gateway/logs may carry")
    own: str | None = Field(
        "gateway",
        max_length=128,
        description="the gateway's own log lines are kept too, under this node name",
    )
    own_level: Literal["debug", "info", "warning", "error"] = Field("info", description="least level kept")


class AlertSettings(_Section):
    """Analysis of the shipped access lines per node and model: error-rate spikes, latency regressions."""

    window_s: float = Field(60.0, gt=0, le=DAY_S, description="the recent span compared with the baseline")
    baseline_s: float = Field(
        600.0, gt=0, le=7 * DAY_S, description="the span before it that sets what is normal"
    )
    evaluate_s: float = Field(5.0, gt=0, le=3600, description="how often the comparison runs")
    min_requests: int = Field(20, ge=1, le=10**9, description="fewer requests in the window say nothing")
    error_rate: float = Field(0.05, gt=0, le=1, description="a window's 5xx share that is a spike at least")
    error_factor: float = Field(3.0, ge=1, le=1e6, description="... and this many times the baseline's share")
    latency_factor: float = Field(
        1.5, gt=1, le=1e6, description="a window's p50 this many times the baseline's"
    )


class OperationsSettings(_Section):
    """Restarts and rollouts the gateway runs on its nodes."""

    drain_timeout_s: float = Field(
        60.0, gt=0, le=DAY_S, description="longest wait for a node's in-flight requests"
    )
    restart_timeout_s: float = Field(
        120.0, gt=0, le=DAY_S, description="longest wait for a restarted node to be ready"
    )
    observe_s: float = Field(
        5.0, ge=0, le=DAY_S, description="a rolled-out node is watched this long before the next"
    )
    max_error_rate: float = Field(0.05, ge=0, le=1, description="5xx share that fails a rolled-out node")
    max_package_bytes: int = Field(
        16 << 30,
        ge=1024,
        le=1 << 40,
        description="largest model package pushed through the gateway (spooled to disk)",
    )


class NodesTls(_Section):
    """How the gateway calls `https://` nodes: it checks them against this CA and shows its own
    certificate (mutual TLS); a node then trusts the caller the gateway vouches for."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class GatewaySettings(EnvFirstSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGEGEN_GATEWAY_", env_nested_delimiter="__", extra="forbid", allow_inf_nan=False
    )

    home: Path = Field(default_factory=default_home, description="where the gateway keeps its state")
    host: HostName = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    grpc_port: int = Field(
        0, ge=0, le=65535, description="KServe v2 over gRPC, relayed to the nodes over HTTP; 0: off"
    )
    workers: int = Field(
        1, ge=1, le=64, description="server processes sharing the port and one fleet (gateway/shared.py)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    nodes: list[NodeEntry] = Field(default_factory=list)
    balancer: BalancerSettings = Field(default_factory=BalancerSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    outlier: OutlierSettings = Field(default_factory=OutlierSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=2**30)
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=2**20)
    connect_timeout_s: float = Field(1.0, gt=0, le=3600)
    read_timeout_s: float = Field(300.0, gt=0, le=DAY_S, description="longest wait for a node's next bytes")
    max_connections_per_node: int = Field(256, ge=1, le=100_000)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    tls: TlsSettings = Field(default_factory=TlsSettings, description="the gateway's own listener")
    nodes_tls: NodesTls | None = Field(None, description="mutual TLS to https:// nodes")
    logs: LogStoreSettings = Field(default_factory=LogStoreSettings)
    operations: OperationsSettings = Field(default_factory=OperationsSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    tracing: GatewayTracingSettings = Field(default_factory=GatewayTracingSettings)
    nodes_key: SecretStr | None = Field(
        None, description="an operator key the nodes accept, for the gateway's own calls without mutual TLS"
    )

    @property
    def keys_file(self) -> Path:
        return self.security.keys_file or self.home / "security" / "keys.sqlite"

    @model_validator(mode="after")
    def _unique(self) -> GatewaySettings:
        names = [node.name for node in self.nodes if node.name]
        urls = [node.url for node in self.nodes]
        if len(set(names)) != len(names) or len(set(urls)) != len(urls):
            raise ValueError("node names and URLs must be unique")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError("grpc_port must differ from port (or be 0: no gRPC)")
        return self


def load_gateway_settings(config_file: Path | None = None) -> GatewaySettings:
    """The TOML file (argument or `EDGEGEN_GATEWAY_CONFIG`), then the environment."""
    env = os.environ.get("EDGEGEN_GATEWAY_CONFIG")
    path = config_file or (Path(env) if env else None)
    values = read_toml(path, "gateway config") if path is not None else {}
    try:
        return GatewaySettings(**values)
    except ValidationError as exc:
        raise settings_error(exc, "EDGEGEN_GATEWAY_*") from None
