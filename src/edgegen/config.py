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

import logging
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgegen.errors import ConfigError, EdgegenError, Forbidden, InvalidInput
from edgegen.security.secrets import SECRET_TYPES, SecretUrl
from edgegen.security.settings import DAY_S, HostName, LocalOnly, SecuritySettings, TlsSettings, Url
from edgegen.toml_writer import dumps

log = logging.getLogger("edgegen.config")
MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # as the model store names them (store/manifest.py)


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "edgegen"


class BatchSettings(BaseModel):
    """Dynamic batching of one fixed-shape model, in Triton's terms."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_batch_size: int = Field(32, ge=1, le=4096, description="rows collated into one forward pass")
    max_queue_delay_us: int = Field(
        0, ge=0, le=1_000_000, description="how long the first request of a batch may wait for company"
    )
    max_queue_size: int = Field(
        1024, ge=1, le=1_000_000, description="waiting requests beyond which the node answers 503"
    )
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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_queue_delay_us: int | None = Field(None, ge=0, le=1_000_000)
    max_queue_size: int | None = Field(None, ge=1, le=1_000_000)
    instances: int | None = Field(None, ge=1, le=16)
    inline_max_us: int | None = Field(None, ge=0, le=100_000)
    cache: bool | None = Field(None, description="keep this model's answers in the response cache")


class OnnxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    intra_op_threads: int = Field(1, ge=0, le=256, description="0 lets ONNX Runtime pick (all cores)")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    memory_arena: bool = True
    memory_pattern: bool = True


class TFLiteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    threads: int = Field(1, ge=1, le=256)


KvType = Literal["f16", "q8_0", "q4_0"]


class LlmSettings(BaseModel):
    """Generation with llama.cpp: `max_num_seqs` sequences of up to `ctx_per_seq` tokens each, sharing one
    KV cache of `kv_budget_mb` (a sequence takes the cells it uses; admission waits for free cells)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_num_seqs: int = Field(8, ge=1, le=256, description="sequences decoded together (continuous batching)")
    ctx_per_seq: int = Field(
        2048, ge=64, le=131_072, description="KV positions per sequence (prompt + output)"
    )
    kv_budget_mb: float = Field(
        0,
        ge=0,
        le=1_048_576,
        description="MB of KV cache one model's sequences share; 0: min(32 MB, RAM/32); at least one context",
    )
    kv_type: KvType = Field(
        "q8_0",
        description="KV cache element type: llama.cpp's q8_0 / q4_0 blocks, or f16 (docs/benchmarks.md)",
    )
    n_batch: int = Field(512, ge=16, le=8192, description="tokens one decode step may carry (prefill chunk)")
    itl_target_ms: float = Field(
        75.0,
        ge=0,
        le=60_000,
        description="while streams run, prompts are prefilled in chunks that keep a step about this long; "
        "0: a prompt takes the whole n_batch",
    )
    speculative_tokens: int = Field(
        4,
        ge=0,
        le=16,
        description="draft tokens a stream may verify per step, guessed from its own prompt and answer "
        "(prompt lookup), where the measured step cost says they pay; 0: off",
    )
    threads: int = Field(0, ge=0, le=256, description="llama.cpp threads; 0: one per core")
    max_waiting: int = Field(
        64, ge=0, le=100_000, description="requests waiting for a slot beyond which the node answers 429"
    )
    timeout_s: float = Field(300.0, gt=0, le=DAY_S, description="deadline of one generation")
    max_messages: int = Field(
        1024, ge=1, le=1_000_000, description="messages one chat request may hold (more: 400)"
    )
    max_prompt_chars: int = Field(
        400_000,
        ge=1,
        le=2**30,
        description="characters of one prompt, a chat's contents together (more: 400)",
    )


class JobsSettings(BaseModel):
    """Asynchronous jobs (POST /v1/jobs): a persistent queue and a pool of workers in the node."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backend: Literal["sqlite", "redis"] = "sqlite"
    path: Path | None = Field(None, description="SQLite file (default: HOME/jobs/jobs.sqlite)")
    redis_url: SecretUrl = Field(
        SecretUrl("redis://127.0.0.1:6379/0"), description="with backend = redis; its password is a secret"
    )
    workers: int = Field(2, ge=0, le=64, description="jobs run at once; 0: this node runs none")
    reserved: int = Field(
        1, ge=0, le=64, description="workers that run even while live requests are in flight (the rest wait)"
    )
    lease_s: float = Field(
        30.0, gt=0, le=DAY_S, description="a job whose worker is silent this long runs again"
    )
    max_attempts: int = Field(3, ge=1, le=100)
    backoff_s: float = Field(1.0, gt=0, le=DAY_S, description="first retry delay; doubles each time")
    retention_s: float = Field(86_400.0, gt=0, le=366 * DAY_S, description="finished jobs are kept this long")
    poll_s: float = Field(0.05, gt=0, le=10, description="an idle worker looks for work this often")
    max_queued_per_tenant: int = Field(
        1000, ge=1, le=10**7, description="unfinished jobs one tenant may have (queued or running; more: 429)"
    )
    max_queued_bytes_per_tenant: int = Field(
        64 * 2**20,
        ge=1,
        le=2**40,
        description="bytes of request bodies of one tenant's unfinished jobs (more: 429)",
    )


class CacheSettings(BaseModel):
    """The response cache: answers to deterministic requests, in memory and on disk (`cache/`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    memory_bytes: int = Field(64 * 2**20, ge=0, le=64 * 2**30, description="in-memory tier; 0: none")
    disk_bytes: int = Field(512 * 2**20, ge=0, le=2**40, description="disk tier; 0: none")
    path: Path | None = Field(
        None, description="SQLite file of the disk tier (default: HOME/cache/responses.sqlite)"
    )
    ttl_s: float = Field(
        3600.0, gt=0, le=366 * DAY_S, description="an answer is served from the cache this long"
    )
    max_entry_bytes: int = Field(4 * 2**20, ge=1, le=2**30, description="larger answers are not kept")


class LogsSettings(BaseModel):
    """Shipping this node's logs to a gateway (`gateway/logstore.py` keeps and searches them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ship_to: Url | None = Field(
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
    spool_bytes: int = Field(
        256 * 2**20, ge=2**20, le=64 * 2**30, description="spool bound; beyond it the oldest lines go"
    )
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="least level shipped")
    access: bool = Field(True, description="ship the access log too (the gateway's analysis reads it)")


class SoftwareSettings(BaseModel):
    """Upgrades of edgegen itself on this node (node/software.py): signed wheels, environments on trial."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    trial_s: float = Field(
        300.0,
        gt=0,
        le=DAY_S,
        description="a new version not confirmed healthy this long after it starts is left",
    )
    keep: int = Field(3, ge=1, le=20, description="environments kept besides the current and previous ones")


class TracingSettings(BaseModel):
    """Traces over OTLP/HTTP (observe/tracing.py): off, and free, unless `endpoint` is set. The gateway
    has the same table, named `edgegen-gateway` by default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    endpoint: Literal[""] | Url = Field(
        "", description="OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces; empty: tracing off"
    )
    service_name: str = Field("edgegen-node", min_length=1, max_length=128, description="service.name")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of the traces begun here that are kept (a caller's flag rules)"
    )
    ca_file: Path | None = Field(
        None,
        description="https endpoint: trust the collector's certificate from this CA (PEM), not the system's",
    )
    cert_file: Path | None = Field(
        None, description="https endpoint: the certificate (PEM) shown to a collector that asks (mutual TLS)"
    )
    key_file: Path | None = None

    @model_validator(mode="after")
    def _tls(self) -> TracingSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if (self.ca_file or self.cert_file) and urlsplit(self.endpoint).scheme != "https":
            raise ValueError("ca_file, cert_file and key_file are for an https:// endpoint")
        return self


class GatewayTracingSettings(TracingSettings):
    service_name: str = Field("edgegen-gateway", min_length=1, max_length=128, description="service.name")


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

    model_config = SettingsConfigDict(
        env_prefix="EDGEGEN_", env_nested_delimiter="__", extra="forbid", allow_inf_nan=False
    )

    home: Path = Field(default_factory=default_home, description="where the node keeps everything")
    store: Path | None = Field(None, description="model store directory (default: HOME/models)")
    host: HostName = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        0, ge=0, le=65535, description="KServe v2 over gRPC (Triton's protocol) on this port; 0: off"
    )
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port")
    default_model: str = Field("digits", pattern=MODEL_NAME, description="what POST /predict serves")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(True, description="one JSON line per request (at log level info or debug)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=2**30)
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=2**20)
    request_timeout_s: float = Field(30.0, gt=0, le=DAY_S, description="deadline of one inference request")
    store_poll_s: float = Field(
        2.0, ge=0, le=3600, description="how often to look for activated versions; 0: never"
    )
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
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    software: SoftwareSettings = Field(default_factory=SoftwareSettings)
    # The operator's file these were read from (None: EDGEGEN_CONFIG, or none): a remote change is
    # checked against it as the next start will read it.
    _config_file: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _ports(self) -> Settings:
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError("grpc_port must differ from port (or be 0: no gRPC)")
        return self

    @property
    def config_file(self) -> Path | None:
        return self._config_file

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


def config_values(config_file: Path | None = None) -> dict[str, Any]:
    """The operator's own TOML file (argument or `EDGEGEN_CONFIG`) as a dict; {} when there is none."""
    env = os.environ.get("EDGEGEN_CONFIG")
    path = config_file or (Path(env) if env else None)
    return read_toml(path, "config file") if path is not None else {}


def load_settings(config_file: Path | None = None) -> Settings:
    """Read the settings once: TOML file (argument or `EDGEGEN_CONFIG`), the remote changes over it,
    then the environment. A remote file that is not good is passed over, loudly (`RemoteChanges`).

    >>> load_settings().port
    8000
    """
    values = config_values(config_file)
    try:
        base = Settings(**values)
    except ValidationError as exc:
        raise settings_error(exc, "EDGEGEN_*") from None
    remote = remote_changes(base, values)
    if remote.problems:
        log.error(remote.warning(base.home))
    settings = remote.settings if remote.settings is not None else base
    settings._config_file = config_file
    return settings


# -- changes made remotely (PATCH /admin/config, node/remote_config.py) ----------------------------------
REMOTE_FILE = "remote.toml"
LAST_GOOD_FILE = "remote.toml.last-good"
# Where the node is reached from, who may call it and what it keeps where: changed on the node itself.
# (Paths, hosts, URLs and secrets are refused by their type wherever they are: `_local_only_type`.)
LOCAL_ONLY = ("host", "port", "home", "store", "workers", "security", "tls", "logs")


def remote_path(home: Path) -> Path:
    """Where a node keeps the settings changed remotely (node/remote_config.py)."""
    return home / "config" / REMOTE_FILE


@dataclass(frozen=True)
class RemoteChanges:
    """The remote changes in force: those of `remote.toml` when it is good, else of the last good file
    before it, else none; `problems` says why a file was passed over (file names only, never paths)."""

    values: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the file they came from
    settings: Settings | None = None  # the operator's file with them, as start-up reads it
    problems: tuple[str, ...] = ()

    def warning(self, home: Path) -> str:
        """One loud line for the node's log: what was wrong, and what the node does instead."""
        instead = (
            f"starting with the last good ones ({self.source})"
            if self.source == LAST_GOOD_FILE
            else "starting without remote changes"
        )
        return f"remote settings in {home / 'config'} passed over: {'; '.join(self.problems)}; {instead}"


def remote_changes(base: Settings, values: dict[str, Any]) -> RemoteChanges:
    """The remote changes to apply over the operator's file (`values`, read as `base`). The last good
    file is read only when `remote.toml` is there and bad: a removed `remote.toml` means no changes."""
    problems: list[str] = []
    newest = remote_path(base.home)
    for path in (newest, newest.with_name(LAST_GOOD_FILE)):
        try:
            if not path.exists():
                break
            remote = tomllib.loads(path.read_text(encoding="utf-8"))
            merged = check_remote(base, values, remote)
        except OSError as exc:
            problems.append(f"{path.name} does not read ({exc.strerror or type(exc).__name__})")
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path.name} is not valid TOML ({exc})")
        except EdgegenError as exc:
            problems.append(f"{path.name}: {exc.message}")
        else:
            return RemoteChanges(remote, path.name, merged, tuple(problems))
    return RemoteChanges(problems=tuple(problems))


def check_remote(base: Settings, values: dict[str, Any], remote: dict[str, Any]) -> Settings:
    """The settings start-up would read with these remote changes, or the error that says which of
    them is not allowed (Forbidden) or not valid (InvalidInput). `values`: the operator's file."""
    for key in flat(remote):
        remote_field(base, key)
    try:
        return Settings(**_merge(values, remote))
    except ValidationError as exc:
        raise InvalidInput(_problems(exc)) from None


def remote_field(settings: Settings, key: str) -> tuple[BaseModel, str, TypeAdapter[Any]]:
    """For a setting a remote change may name (`cache.ttl_s`, `models.digits.max_batch_size`): the
    model holding it, the field's name, and an adapter that validates its values as start-up does.
    Forbidden for what is changed on the node itself only; InvalidInput for what is not one setting."""
    parts = key.split(".")
    if parts[0] in LOCAL_ONLY:
        raise Forbidden(f"{key}: {parts[0]} is changed on the node itself, not remotely")
    holder: BaseModel = settings
    if parts[0] == "models" and len(parts) == 3:  # a per-model override: models.NAME.FIELD
        if not re.fullmatch(MODEL_NAME, parts[1]):
            raise InvalidInput(f"{key}: {parts[1]!r} is not a model name")
        holder = settings.models.get(parts[1]) or ModelOverrides()
        parts = parts[2:]
    for part in parts[:-1]:
        child = getattr(holder, part, None) if part in type(holder).model_fields else None
        if not isinstance(child, BaseModel):
            raise InvalidInput(f"{key}: no such setting")
        holder = child
    name = parts[-1]
    info = type(holder).model_fields.get(name)
    if info is None or isinstance(getattr(holder, name), BaseModel | dict | list):
        raise InvalidInput(f"{key}: no such setting, or not one value")
    if _local_only_type(info.annotation) or any(_local_only_type(m) for m in info.metadata):
        raise Forbidden(f"{key}: a path, host, URL or secret is changed on the node itself, not remotely")
    # (the field's type with its constraints, e.g. Annotated[int, Gt(0)], as pydantic validates it)
    return holder, name, TypeAdapter(info.rebuild_annotation(), config=ConfigDict(allow_inf_nan=False))


def _local_only_type(kind: Any) -> bool:
    """Whether a type is, or holds, a path, a secret or a `LocalOnly` one (a host, a URL)."""
    if isinstance(kind, LocalOnly):
        return True
    if isinstance(kind, type):
        return issubclass(kind, (PurePath, *SECRET_TYPES))
    return any(_local_only_type(arg) for arg in get_args(kind))


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: {"cache": {"ttl_s": 1}} → {"cache.ttl_s": 1}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        out |= flat(value, path + ".") if isinstance(value, dict) else {path: value}
    return out


def write_remote(home: Path, remote: dict[str, Any], *, keep_current: bool) -> None:
    """Write the remote changes as `remote.toml`, atomically: a reader (another worker, the next start)
    finds the old file or the new one, whole, even after a crash. With `keep_current` the file it
    replaces (known good) is kept first as `remote.toml.last-good`. ValueError: not writable as TOML."""
    path = remote_path(home)
    text = "# Written by the node on remote configuration changes (PATCH /admin/config).\n" + dumps(remote)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if keep_current and path.exists():
        _replace(path.with_name(LAST_GOOD_FILE), path.read_bytes())
    _replace(path, text.encode())


def _replace(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def settings_error(exc: ValidationError, variables: str) -> ConfigError:
    """Every problem of a settings object in one line that says where to fix it."""
    return ConfigError(
        f"invalid settings ({_problems(exc)}); fix the TOML file or the {variables} variable of that name"
    )


def _problems(exc: ValidationError) -> str:
    """`setting: what is wrong` for each problem (never the value, which may be a secret)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
    )
