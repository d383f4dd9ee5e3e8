"""Typed settings, read once at start-up.

Sources, strongest first: `EDGEGEN_*` environment variables (every CLI flag sets its twin, so a flag
always wins), then the changes made remotely (`HOME/config/remote.toml`, node/remote_config.py), then
the TOML file named by `--config` / `EDGEGEN_CONFIG`, then the defaults below.
Nested fields use a double underscore: `EDGEGEN_ONNX__INTRA_OP_THREADS=2`.

Example TOML:

    port = 8000
    default_model = "digits"
    [batching]
    max_batch_size = 32
    max_queue_delay_us = 200
    [models.digits]
    max_batch_size = 64
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgegen.errors import ConfigError
from edgegen.security.settings import SecuritySettings, TlsSettings


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "edgegen"


class BatchSettings(BaseModel):
    """Dynamic batching of one fixed-shape model, in Triton's terms."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=4096, description="rows collated into one forward pass")
    max_queue_delay_us: int = Field(
        0, ge=0, le=1_000_000, description="how long the first request of a batch may wait for company"
    )
    max_queue_size: int = Field(1024, ge=1, description="waiting requests beyond which the node answers 503")
    instances: int = Field(1, ge=1, le=16, description="forward passes of this model that may run at once")
    inline_max_us: int = Field(
        150,
        ge=0,
        le=100_000,
        description="run a batch on the event loop when it is expected to take at most this long "
        "(the thread hand-off costs ~100 µs); 0: always in a worker thread",
    )


class ModelOverrides(BaseModel):
    """Per-model settings; any field left out takes the node-wide `[batching]` value."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_queue_delay_us: int | None = Field(None, ge=0, le=1_000_000)
    max_queue_size: int | None = Field(None, ge=1)
    instances: int | None = Field(None, ge=1, le=16)
    inline_max_us: int | None = Field(None, ge=0, le=100_000)
    cache: bool | None = Field(None, description="keep this model's answers in the response cache")


class OnnxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intra_op_threads: int = Field(1, ge=0, le=256, description="0 lets ONNX Runtime pick (all cores)")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    memory_arena: bool = True
    memory_pattern: bool = True


class TFLiteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threads: int = Field(1, ge=1, le=256)


class LlmSettings(BaseModel):
    """Generation with llama.cpp: one context holding `max_num_seqs` sequences of `ctx_per_seq` tokens."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(8, ge=1, le=256, description="sequences decoded together (continuous batching)")
    ctx_per_seq: int = Field(
        2048, ge=64, le=131_072, description="KV positions per sequence (prompt + output)"
    )
    n_batch: int = Field(512, ge=16, le=8192, description="tokens one decode step may carry (prefill chunk)")
    threads: int = Field(0, ge=0, le=256, description="llama.cpp threads; 0: one per core")
    max_waiting: int = Field(
        64, ge=0, description="requests waiting for a slot beyond which the node answers 429"
    )
    timeout_s: float = Field(300.0, gt=0, description="deadline of one generation")


class JobsSettings(BaseModel):
    """Asynchronous jobs (POST /v1/jobs): a persistent queue and a pool of workers in the node."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite", "redis"] = "sqlite"
    path: Path | None = Field(None, description="SQLite file (default: HOME/jobs/jobs.sqlite)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="with backend = redis")
    workers: int = Field(2, ge=0, le=64, description="jobs run at once; 0: this node runs none")
    reserved: int = Field(
        1, ge=0, le=64, description="workers that run even while live requests are in flight (the rest wait)"
    )
    lease_s: float = Field(30.0, gt=0, description="a job whose worker is silent this long runs again")
    max_attempts: int = Field(3, ge=1, le=100)
    backoff_s: float = Field(1.0, gt=0, description="first retry delay; doubles each time")
    retention_s: float = Field(86_400.0, gt=0, description="finished jobs are kept this long")
    poll_s: float = Field(0.05, gt=0, le=10, description="an idle worker looks for work this often")


class CacheSettings(BaseModel):
    """The response cache: answers to deterministic requests, in memory and on disk (`cache/`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    memory_bytes: int = Field(64 * 2**20, ge=0, description="in-memory tier; 0: none")
    disk_bytes: int = Field(512 * 2**20, ge=0, description="disk tier; 0: none")
    path: Path | None = Field(
        None, description="SQLite file of the disk tier (default: HOME/cache/responses.sqlite)"
    )
    ttl_s: float = Field(3600.0, gt=0, description="an answer is served from the cache this long")
    max_entry_bytes: int = Field(4 * 2**20, ge=1, description="larger answers are not kept")


class LogsSettings(BaseModel):
    """Shipping this node's logs to a gateway (`gateway/logstore.py` keeps and searches them)."""

    model_config = ConfigDict(extra="forbid")

    ship_to: str | None = Field(
        None, description="the gateway's URL, e.g. https://gw:8080; unset: no shipping"
    )
    node: str | None = Field(None, description="this node's name in the fleet's logs (default: host:port)")
    key: SecretStr | None = Field(None, description="an operator API key for the gateway (EDGEGEN_LOGS__KEY)")
    ca_file: Path | None = Field(None, description="CA that signed the gateway's certificate (https)")
    cert_file: Path | None = Field(
        None,
        description="this node's certificate (`pki issue-node`): a mutual-TLS gateway takes it for a key",
    )
    key_file: Path | None = Field(None, description="the private key of cert_file")
    interval_s: float = Field(1.0, gt=0, le=60, description="lines are spooled and sent this often")
    batch: int = Field(1000, ge=1, le=100_000, description="lines per request to the gateway")
    spool_bytes: int = Field(256 * 2**20, ge=2**20, description="spool bound; beyond it the oldest lines go")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="least level shipped")
    access: bool = Field(True, description="ship the access log too (the gateway's analysis reads it)")


class SoftwareSettings(BaseModel):
    """Upgrades of edgegen itself on this node (node/software.py): signed wheels, environments on trial."""

    model_config = ConfigDict(extra="forbid")

    trial_s: float = Field(
        300.0, gt=0, description="a new version not confirmed healthy this long after it starts is left"
    )
    keep: int = Field(3, ge=1, le=20, description="environments kept besides the current and previous ones")


class EnvFirstSettings(BaseSettings):
    """Settings whose environment variables outrank the TOML file (which arrives as init values)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Every CLI flag sets its environment twin, so a flag always wins over the file.
        return env_settings, init_settings


class Settings(EnvFirstSettings):
    """Everything a node reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="EDGEGEN_", env_nested_delimiter="__", extra="forbid")

    home: Path = Field(default_factory=default_home, description="where the node keeps everything")
    store: Path | None = Field(None, description="model store directory (default: HOME/models)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port")
    default_model: str = "digits"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(True, description="one JSON line per request (at log level info or debug)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of one inference request")
    store_poll_s: float = Field(2.0, ge=0, description="how often to look for activated versions; 0: never")
    batching: BatchSettings = Field(default_factory=BatchSettings)
    models: dict[str, ModelOverrides] = Field(default_factory=dict)
    onnx: OnnxSettings = Field(default_factory=OnnxSettings)
    tflite: TFLiteSettings = Field(default_factory=TFLiteSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    logs: LogsSettings = Field(default_factory=LogsSettings)
    software: SoftwareSettings = Field(default_factory=SoftwareSettings)

    @property
    def keys_file(self) -> Path:
        return self.security.keys_file or self.home / "security" / "keys.sqlite"

    @property
    def store_dir(self) -> Path:
        return self.store if self.store is not None else self.home / "models"

    @property
    def wheel_cache(self) -> Path:
        """Where the wheels that carry default models are kept once downloaded."""
        return self.home / "cache" / "wheels"

    def caches(self, model: str) -> bool:
        """Whether `model`'s answers go to the response cache."""
        override = self.models.get(model)
        chosen = override.cache if override is not None else None
        return self.cache.enabled if chosen is None else chosen and self.cache.enabled

    def batching_for(self, model: str) -> BatchSettings:
        override = self.models.get(model)
        if override is None:
            return self.batching
        return self.batching.model_copy(update=override.model_dump(exclude_none=True, exclude={"cache"}))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict, or a ConfigError naming `what` it was meant to be."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; pass an existing TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def load_settings(config_file: Path | None = None) -> Settings:
    """Read the settings once: TOML file (argument or `EDGEGEN_CONFIG`), then the environment.

    >>> load_settings().port
    8000
    """
    path = config_file or (Path(os.environ["EDGEGEN_CONFIG"]) if os.environ.get("EDGEGEN_CONFIG") else None)
    values = read_toml(path, "config file") if path is not None else {}
    try:
        settings = Settings(**values)
        remote = read_remote(settings.home)  # changes made through PATCH /admin/config, over the file
        return Settings(**_merge(values, remote)) if remote else settings
    except ValidationError as exc:
        raise settings_error(exc, "EDGEGEN_*") from None


def remote_path(home: Path) -> Path:
    """Where a node keeps the settings changed remotely (node/remote_config.py)."""
    return home / "config" / "remote.toml"


def read_remote(home: Path) -> dict[str, Any]:
    path = remote_path(home)
    return read_toml(path, "remote configuration") if path.exists() else {}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def settings_error(exc: ValidationError, variables: str) -> ConfigError:
    """Every problem of a settings object in one line that says where to fix it."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
    )
    return ConfigError(
        f"invalid settings ({problems}); fix the TOML file or the {variables} variable of that name"
    )
