"""Changing a node's configuration from afar (`GET`/`PATCH /admin/config`, fanned out by the gateway).

A change names settings by path (`cache.ttl_s`, `batching.max_batch_size`, `log_level`) with new values.
Each is validated against its field (type and bounds) before anything changes; then all are written to
`HOME/config/remote.toml`, which the node reads at start over its own config file (the environment and
command-line flags still win). Those in `LIVE` take effect at once in the process that answered; the
others at the next restart, and the answer says which; other worker processes of the node take the live
ones within `store_poll_s` (`watch`). Where the node is reached from, who may call it
and where it keeps its data (`host`, `port`, `home`, `store`, `security.*`, `tls.*`) are changed on the
node itself, never remotely; a setting the node's environment sets is refused too, since the environment
would win over it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from edgegen.config import ModelOverrides, Settings, read_remote, remote_path
from edgegen.errors import Forbidden, InvalidInput
from edgegen.store.manifest import check_name

log = logging.getLogger("edgegen.admin")
# Read anew on every use, so a changed value holds from the next request on.
LIVE = frozenset(
    {"log_level", "request_timeout_s", "cache.ttl_s", "cache.max_entry_bytes", "llm.timeout_s", "jobs.poll_s"}
)
LOCAL_ONLY = ("host", "port", "home", "store", "workers", "security", "tls", "logs")
MAX_CHANGES = 64


def _field(settings: Settings, key: str) -> tuple[BaseModel, str, Any]:
    """The model holding `key`, the field's name, and an adapter that validates its values."""
    parts = key.split(".")
    if parts[0] in LOCAL_ONLY:
        raise Forbidden(f"{key}: {parts[0]} is changed on the node itself, not remotely")
    holder: BaseModel = settings
    if parts[0] == "models" and len(parts) == 3:  # a per-model override: models.NAME.FIELD
        check_name(parts[1], "model")
        holder = settings.models.get(parts[1]) or ModelOverrides()
        parts = parts[2:]
    for part in parts[:-1]:
        child = getattr(holder, part, None) if part in type(holder).model_fields else None
        if not isinstance(child, BaseModel):
            raise InvalidInput(f"{key}: no such setting")
        holder = child
    name = parts[-1]
    field = type(holder).model_fields.get(name)
    if field is None or isinstance(getattr(holder, name), BaseModel | dict | list):
        raise InvalidInput(f"{key}: no such setting, or not one value")
    kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    return holder, name, TypeAdapter(kind)


def _environment(key: str) -> str:
    return "EDGEGEN_" + key.replace(".", "__").upper()


def change(settings: Settings, changes: dict[str, Any]) -> dict[str, Any]:
    """Validate every change, persist them all, apply the live ones; refuse the whole lot on any error."""
    if not isinstance(changes, dict) or not 0 < len(changes) <= MAX_CHANGES:
        raise InvalidInput(f"changes must be an object of 1 to {MAX_CHANGES} settings")
    checked = []
    for key, value in changes.items():
        holder, name, adapter = _field(settings, key)
        if _environment(key) in os.environ:
            raise Forbidden(f"{key}: the node's environment sets {_environment(key)}, which would win")
        try:
            checked.append((key, holder, name, adapter.validate_python(value)))
        except ValidationError as exc:
            raise InvalidInput(f"{key}: {exc.errors()[0]['msg']}") from None
    stored = read_remote(settings.home)
    for key, _, _, value in checked:
        *sections, name = key.split(".")
        table = stored
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = value
    _write(remote_path(settings.home), stored)
    applied = []
    for key, holder, name, value in checked:
        if key in LIVE:
            _set(key, holder, name, value)
            applied.append(key)
    later = [key for key, *_ in checked if key not in LIVE]
    log.info("configuration changed", extra={"applied": applied, "on_restart": later})
    return {"applied": applied, "on_restart": later, "remote": stored}


def _set(key: str, holder: BaseModel, name: str, value: Any) -> None:
    setattr(holder, name, value)
    if key == "log_level":
        logging.getLogger().setLevel(str(value).upper())


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        out |= _flat(value, path + ".") if isinstance(value, dict) else {path: value}
    return out


def apply_live(settings: Settings) -> list[str]:
    """Take the live settings of the remote file that differ from those in force (another worker process
    of this node wrote them); return their names. A value that no longer validates is left out, logged."""
    applied = []
    for key, value in _flat(read_remote(settings.home)).items():
        if key not in LIVE:
            continue
        holder, name, adapter = _field(settings, key)
        try:
            valid = adapter.validate_python(value)
        except ValidationError:
            log.warning("remote setting not applied: invalid", extra={"setting": key})
            continue
        if getattr(holder, name) != valid:
            _set(key, holder, name, valid)
            applied.append(key)
    if applied:
        log.info("remote settings applied", extra={"applied": applied})
    return applied


async def watch(settings: Settings, interval: float) -> None:
    """Apply the live settings whenever the remote file changes (with --workers, each process watches)."""
    path = remote_path(settings.home)
    seen = path.stat().st_mtime_ns if path.exists() else None
    while True:
        await asyncio.sleep(interval)
        try:
            now = path.stat().st_mtime_ns if path.exists() else None
            if now != seen:
                seen = now
                apply_live(settings)
        except Exception:  # a bad file must not end the watch
            log.exception("remote settings not read")


def _write(path: Path, values: dict[str, Any]) -> None:
    """The remote settings as TOML (one value per line; tables for sections), written atomically."""
    lines, tables = [], []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(prefix: str, items: dict[str, Any]) -> None:
        rows = [f"{k} = {scalar(v)}" for k, v in items.items() if not isinstance(v, dict)]
        if rows:
            tables.append((prefix, rows))
        for k, v in items.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", values)
    for prefix, rows in tables:
        lines += ([f"[{prefix}]"] if prefix else []) + rows + [""]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        "# Written by the node on remote configuration changes (PATCH /admin/config).\n" + "\n".join(lines)
    )
    temporary.replace(path)


def effective(settings: Settings) -> dict[str, Any]:
    """The settings in force, secrets shown as stars."""
    return settings.model_dump(mode="json")
