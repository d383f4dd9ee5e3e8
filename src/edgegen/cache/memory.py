"""The in-memory tier: least recently used out first, bounded in bytes, entries expire."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

ENTRY_OVERHEAD = 200  # bytes an entry costs beside its key and value (dict slot, objects)


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    model: str
    tag: str  # the model version it came from (cache.keys.model_tag)
    stored: float  # wall-clock seconds
    expires: float

    def size(self, key: bytes) -> int:
        return len(self.value) + len(key) + ENTRY_OVERHEAD


@dataclass
class Removed:
    """What a call pushed out, for the metrics: by the size bound, by age, by activation."""

    size: int = 0
    expired: int = 0
    invalidated: int = 0


class MemoryTier:
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, removed: Removed) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._pop(key)
            removed.expired += 1
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry, removed: Removed) -> None:
        size = entry.size(key)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._pop(key)
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._pop(oldest)
            removed.size += 1

    def invalidate(self, model: str, keep_tag: str | None, removed: Removed) -> None:
        """Drop `model`'s entries but those of version `keep_tag` (None: all of them)."""
        stale = [k for k, e in self._entries.items() if e.model == model and e.tag != keep_tag]
        for key in stale:
            self._pop(key)
        removed.invalidated += len(stale)

    def _pop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size(key)
