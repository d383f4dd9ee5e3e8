"""The response cache: answers to deterministic requests, kept so the same request is never computed twice.

The inference service (engine/service.py) asks for a `Ticket` (the request's key and what its
`Cache-Control` allows, read by `directives`), `lookup`s it, and `store`s what it computed. The memory
tier answers first; the disk tier (optional) outlives restarts and is shared by a node's worker
processes; a disk hit is copied into memory. Writes to disk happen on one writer thread, off the
request's path. Only deterministic requests are cached: fixed-shape inference, and generations that
are greedy or carry a seed.

Request directives (RFC 9111): `no-cache` computes afresh (and stores the result), `no-store` keeps the
answer out of the cache, `max-age=N` accepts only answers at most N seconds old. Every answer of a
cached model says `X-Edgegen-Cache: hit | miss | bypass`; hits carry `Age`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from edgegen.cache.disk import DiskTier
from edgegen.cache.keys import model_tag
from edgegen.cache.memory import Entry, MemoryTier, Removed
from edgegen.config import Settings
from edgegen.security.atrest import Keyring
from edgegen.store import Manifest

log = logging.getLogger(__name__)
MAX_PENDING_WRITES = 256  # beyond this many disk writes waiting, new answers stay in memory only


class CacheObserver(Protocol):
    def on_lookup(self, model: str, result: str, tier: str | None) -> None: ...

    def on_removed(self, tier: str, removed: Removed) -> None: ...

    def on_size(self, tier: str, size: int, entries: int) -> None: ...


@dataclass
class Ticket:
    """One request's place in the cache."""

    model: str
    tag: str
    key: bytes = b""
    read: bool = False
    write: bool = False
    max_age: float | None = None
    status: str = "bypass"  # hit | miss | bypass
    age: float = 0.0

    @property
    def headers(self) -> dict[str, str]:
        if self.status == "hit":
            return {"X-Edgegen-Cache": "hit", "Age": str(int(self.age))}
        return {"X-Edgegen-Cache": self.status}


class Directives(NamedTuple):
    """What a request's Cache-Control lets the cache do for it."""

    read: bool = True
    write: bool = True
    max_age: float | None = None


def directives(scope: Mapping[str, Any]) -> Directives:
    """(may read, may write, max age) from the request's Cache-Control."""
    read, write, max_age = True, True, None
    for name, value in scope.get("headers", ()):
        if name != b"cache-control":
            continue
        for token in value.decode("latin-1").lower().split(","):
            directive, _, argument = token.strip().partition("=")
            if directive == "no-cache":
                read = False
            elif directive == "no-store":
                write = False
            elif directive == "max-age" and argument.strip().isascii() and argument.strip().isdigit():
                max_age = float(argument.strip())  # isascii: isdigit() also takes "²", float() does not
    return Directives(read, write, max_age)


class ResponseCache:
    def __init__(
        self,
        settings: Settings,
        keyring: Keyring | None = None,
        observer: CacheObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        s = settings.cache
        self._settings = settings
        self._observer = observer
        self._clock = clock
        self.memory = MemoryTier(s.memory_bytes, clock) if s.memory_bytes else None
        self.disk: DiskTier | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._submitted = 0  # disk writes asked for (event loop thread only)
        self._completed = 0  # and done (writer thread only)
        if s.enabled and s.disk_bytes:
            path = s.path or settings.home / "cache" / "responses.sqlite"
            self.disk = DiskTier(Path(path), s.disk_bytes, keyring, clock)
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="edgegen-cache")
            self._report("disk")

    @property
    def enabled(self) -> bool:
        return self._settings.cache.enabled and (self.memory is not None or self.disk is not None)

    def ticket(
        self,
        owner: str,
        asked: Directives,
        manifest: Manifest,
        key: Callable[[str, str, str], bytes],
        *,
        deterministic: bool,
    ) -> Ticket | None:
        """None when `manifest`'s model is not cached at all; else the ticket of `owner`'s request (what
        `asked` allows), its key made by `key(owner, model, tag)` when the request may use the cache."""
        if not self.enabled or not self._settings.caches(manifest.name):
            return None
        ticket = Ticket(manifest.name, model_tag(manifest))
        if not deterministic:
            return ticket
        ticket.read, ticket.write, ticket.max_age = asked
        if ticket.read or ticket.write:
            ticket.key = key(owner, manifest.name, ticket.tag)
        return ticket

    def lookup(self, ticket: Ticket) -> bytes | None:
        """The cached answer, or None (the ticket then says miss or bypass)."""
        if not ticket.read:
            self._observe(ticket.model, "bypass", None)
            return None
        removed = Removed()
        entry, tier = (self.memory.get(ticket.key, removed), "memory") if self.memory else (None, "memory")
        self._removed("memory", removed)
        if entry is None and self.disk is not None:
            entry, tier = self.disk.get(ticket.key), "disk"
            if entry is not None:
                self._promote(ticket.key, entry)
                self._write(self.disk.touch, ticket.key)
        now = self._clock()
        if entry is None or (ticket.max_age is not None and now - entry.stored > ticket.max_age):
            ticket.status = "miss"
            self._observe(ticket.model, "miss", None)
            return None
        ticket.status, ticket.age = "hit", max(now - entry.stored, 0.0)
        self._observe(ticket.model, "hit", tier)
        return entry.value

    def store(self, ticket: Ticket, value: bytes) -> None:
        if not ticket.write or len(value) > self._settings.cache.max_entry_bytes:
            return
        now = self._clock()
        entry = Entry(value, ticket.model, ticket.tag, now, now + self._settings.cache.ttl_s)
        self._promote(ticket.key, entry)
        if self.disk is not None:
            self._write(self._disk_put, ticket.key, entry)

    def invalidate(self, model: str, keep: Manifest | None) -> None:
        """A new version of `model` is served (`keep`), or none is: its other answers go."""
        keep_tag = model_tag(keep) if keep is not None else None
        if self.memory is not None:
            removed = Removed()
            self.memory.invalidate(model, keep_tag, removed)
            self._removed("memory", removed)
        if self.disk is not None:
            self._write(self._disk_invalidate, model, keep_tag)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()

    def _promote(self, key: bytes, entry: Entry) -> None:
        if self.memory is None:
            return
        removed = Removed()
        self.memory.put(key, entry, removed)
        self._removed("memory", removed)
        self._report("memory")

    def _disk_put(self, key: bytes, entry: Entry) -> None:
        assert self.disk is not None
        removed = Removed()
        self.disk.put(key, entry, removed)
        self._removed("disk", removed)
        self._report("disk")

    def _disk_invalidate(self, model: str, keep_tag: str | None) -> None:
        assert self.disk is not None
        removed = Removed()
        self.disk.invalidate(model, keep_tag, removed)
        self._removed("disk", removed)
        self._report("disk")

    def _write(self, work: Callable[..., None], *args: Any) -> None:
        assert self._writer is not None
        if self._submitted - self._completed >= MAX_PENDING_WRITES:
            log.warning("disk cache writes fall behind; this answer stays in memory only")
            return
        self._submitted += 1
        self._writer.submit(work, *args).add_done_callback(self._written)

    def _written(self, done: Future[None]) -> None:
        self._completed += 1
        if (exc := done.exception()) is not None:
            log.error("disk cache write failed", exc_info=exc)

    def _observe(self, model: str, result: str, tier: str | None) -> None:
        if self._observer is not None:
            self._observer.on_lookup(model, result, tier)

    def _removed(self, tier: str, removed: Removed) -> None:
        if self._observer is not None and (removed.size or removed.expired or removed.invalidated):
            self._observer.on_removed(tier, removed)
            self._report(tier)

    def _report(self, tier: str) -> None:
        if self._observer is None:
            return
        if tier == "memory" and self.memory is not None:
            self._observer.on_size("memory", self.memory.bytes, len(self.memory))
        elif tier == "disk" and self.disk is not None:
            self._observer.on_size("disk", *self.disk.usage)
