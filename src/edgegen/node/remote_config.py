"""Changing a node's configuration from afar (`GET`/`PATCH /admin/config`, fanned out by the gateway).

A change names settings by path (`cache.ttl_s`, `batching.max_batch_size`, `log_level`) with new values.
Each is validated against its field (type and bounds); then the whole settings the node would start
with (its own file, the remote changes with this one, the environment) are validated as start-up
validates them, before anything is written. Only then are all written to `HOME/config/remote.toml`
(atomically; the file it replaces is kept as the last good one, config.py), which the node reads at
start over its own config file (the environment and command-line flags still win). Those in `LIVE`
take effect at once in the process that answered; the others at the next restart, and the answer says
which; other worker processes of the node take the live ones within `store_poll_s` (`watch`).

What a remote change may never touch is changed on the node itself: where the node is reached from,
who may call it and where it keeps its data (`host`, `port`, `home`, `store`, `security.*`, `tls.*`,
`logs.*`), and, wherever they are, every path, host, URL and secret, known by its type
(`config.remote_field`). A setting the node's environment sets is refused too, since the environment
would win over it.
"""

from __future__ import annotations

import asyncio
import copy
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ValidationError

from edgegen.config import (
    REMOTE_FILE,
    RemoteChanges,
    Settings,
    check_remote,
    config_values,
    flat,
    remote_changes,
    remote_field,
    remote_path,
    write_remote,
)
from edgegen.errors import ConfigError, Forbidden, InvalidInput, Unprocessable
from edgegen.security.secrets import shown

log = logging.getLogger("edgegen.admin")
# Read anew on every use, so a changed value holds from the next request on.
LIVE = frozenset(
    {"log_level", "request_timeout_s", "cache.ttl_s", "cache.max_entry_bytes", "llm.timeout_s", "jobs.poll_s"}
)
MAX_CHANGES = 64


def _environment(key: str) -> str:
    return "EDGEGEN_" + key.replace(".", "__").upper()


def change(settings: Settings, changes: dict[str, Any]) -> dict[str, Any]:
    """Validate every change and the settings they make, persist them all, apply the live ones; refuse
    the whole lot on any error (InvalidInput, Forbidden), with nothing written."""
    if not isinstance(changes, dict) or not 0 < len(changes) <= MAX_CHANGES:
        raise InvalidInput(f"changes must be an object of 1 to {MAX_CHANGES} settings")
    checked = []
    for key, value in changes.items():
        holder, name, adapter = remote_field(settings, key)
        if _environment(key) in os.environ:
            raise Forbidden(f"{key}: the node's environment sets {_environment(key)}, which would win")
        if value is None:
            raise InvalidInput(f"{key}: null cannot be set remotely; give a value")
        try:
            checked.append((key, holder, name, adapter.validate_python(value)))
        except ValidationError as exc:
            raise InvalidInput(f"{key}: {exc.errors()[0]['msg']}") from None
    with _locked(settings):
        values, base = _operator_settings(settings)
        current = remote_changes(base, values)
        stored = copy.deepcopy(current.values)
        for key, _, _, value in checked:
            *sections, name = key.split(".")
            table = stored
            for section in sections:
                table = table.setdefault(section, {})
            table[name] = value
        check_remote(base, values, stored)  # what start-up would read: refused here, not there
        try:
            write_remote(settings.home, stored, keep_current=current.source == REMOTE_FILE)
        except ValueError as exc:
            raise InvalidInput(f"{', '.join(changes)}: {exc}") from None
        # Still under the lock: a change that wrote after this one must also apply after it, or this
        # process would run an older value than its file holds (two PATCHes, each in a thread).
        applied = []
        for key, holder, name, value in checked:
            if key in LIVE:
                _set(key, holder, name, value)
                applied.append(key)
    later = [key for key, *_ in checked if key not in LIVE]
    log.info("configuration changed", extra={"applied": applied, "on_restart": later})
    return {"applied": applied, "on_restart": later, "remote": stored}


@contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """One change at a time across this node's worker processes (read, merge, write)."""
    folder = remote_path(settings.home).parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / "remote.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _operator_settings(settings: Settings) -> tuple[dict[str, Any], Settings]:
    """The node's own file as the next start reads it, and the settings it makes without remote
    changes. Unprocessable (no path in the message) when it no longer reads."""
    try:
        values = config_values(settings.config_file)
        return values, Settings(**values)
    except (ConfigError, ValidationError):
        log.warning("the node's config file no longer reads as it did at start", exc_info=True)
        raise Unprocessable(
            "the node's own config file no longer reads; fix it on the node before changing settings"
        ) from None


def in_force(settings: Settings) -> RemoteChanges:
    """The remote changes the node would start with now, and what is wrong with the files passed over."""
    try:
        values, base = _operator_settings(settings)
    except Unprocessable as exc:
        return RemoteChanges(problems=(exc.message,))
    return remote_changes(base, values)


def _set(key: str, holder: BaseModel, name: str, value: Any) -> None:
    setattr(holder, name, value)
    if key == "log_level":
        logging.getLogger().setLevel(str(value).upper())


def apply_live(settings: Settings) -> list[str]:
    """Take the live settings of the remote changes in force that differ from those in this process
    (another worker process of this node wrote them); return their names. Read and applied under the
    changes' lock (it blocks: call it in a thread), so a change made meanwhile is never undone by the
    older file read before it."""
    with _locked(settings):
        remote = in_force(settings)
        applied = []
        for key, value in flat(remote.values).items():
            if key not in LIVE:
                continue
            holder, name, adapter = remote_field(settings, key)
            valid = adapter.validate_python(value)  # (in_force validated the whole)
            if getattr(holder, name) != valid:
                _set(key, holder, name, valid)
                applied.append(key)
    if remote.problems:
        log.warning("remote settings passed over", extra={"problems": list(remote.problems)})
    if applied:
        log.info("remote settings applied", extra={"applied": applied})
    return applied


async def watch(settings: Settings, interval: float) -> None:
    """Apply the live settings whenever the remote file changes (with --workers, each process watches),
    and at the first look whatever changed since `settings` were read: another worker may have taken a
    change while this one loaded its models, before its watch began."""
    path = remote_path(settings.home)
    seen: int | None = -1  # no look yet (no file's time)
    while True:
        await asyncio.sleep(interval)
        try:
            now = path.stat().st_mtime_ns if path.exists() else None
            if now != seen:
                seen = now
                await asyncio.to_thread(apply_live, settings)
        except Exception:  # observability of a bad file must not end the watch
            log.exception("remote settings not read")


def effective(settings: Settings) -> dict[str, Any]:
    """The settings in force, every secret as stars (security/secrets.py), and the remote changes the
    node would start with; `remote_problems` says why a remote file was passed over."""
    remote = in_force(settings)
    return {"settings": shown(settings), "remote": remote.values, "remote_problems": list(remote.problems)}
