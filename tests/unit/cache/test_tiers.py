"""The two tiers on their own: bounds in bytes, LRU order, expiry, invalidation by model version, and
the disk tier's sealing with the node's keyring."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edgegen.cache.disk import ROW_OVERHEAD, DiskTier
from edgegen.cache.memory import ENTRY_OVERHEAD, Entry, MemoryTier, Removed
from edgegen.security.atrest import Keyring, new_key
from tests.threaded import read_while_written


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def entry(value: bytes, clock: Clock, *, model: str = "m", tag: str = "t1", ttl: float = 60) -> Entry:
    return Entry(value, model, tag, clock.now, clock.now + ttl)


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def test_memory_keeps_the_recently_used_within_its_bytes() -> None:
    clock = Clock()
    size = 100 + 32 + ENTRY_OVERHEAD
    tier = MemoryTier(3 * size, clock)
    removed = Removed()
    for i in range(3):
        tier.put(key(i), entry(bytes(100), clock), removed)
    assert tier.get(key(0), removed) is not None  # 0 is now the most recent; 1 the least
    tier.put(key(3), entry(bytes(100), clock), removed)
    assert tier.get(key(1), removed) is None
    assert all(tier.get(key(i), removed) is not None for i in (0, 2, 3))
    assert (tier.bytes, len(tier), removed.size) == (3 * size, 3, 1)


def test_memory_replaces_in_place_and_refuses_what_cannot_fit() -> None:
    clock = Clock()
    tier = MemoryTier(1_000, clock)
    removed = Removed()
    tier.put(key(1), entry(b"a" * 100, clock), removed)
    tier.put(key(1), entry(b"b" * 200, clock), removed)
    assert tier.bytes == 200 + 32 + ENTRY_OVERHEAD
    tier.put(key(2), entry(bytes(2_000), clock), removed)
    assert tier.get(key(2), removed) is None
    found = tier.get(key(1), removed)
    assert found is not None
    assert found.value == b"b" * 200
    assert removed.size == 0


def test_memory_entries_expire() -> None:
    clock = Clock()
    tier = MemoryTier(10_000, clock)
    removed = Removed()
    tier.put(key(1), entry(b"x", clock, ttl=10), removed)
    clock.now += 9.9
    assert tier.get(key(1), removed) is not None
    clock.now += 0.2
    assert tier.get(key(1), removed) is None
    assert (removed.expired, tier.bytes, len(tier)) == (1, 0, 0)


def test_memory_invalidation_keeps_only_the_served_version() -> None:
    clock = Clock()
    tier = MemoryTier(10_000, clock)
    removed = Removed()
    tier.put(key(1), entry(b"old", clock, tag="t1"), removed)
    tier.put(key(2), entry(b"new", clock, tag="t2"), removed)
    tier.put(key(3), entry(b"other", clock, model="n", tag="t1"), removed)
    tier.invalidate("m", "t2", removed)
    assert tier.get(key(1), removed) is None
    assert tier.get(key(2), removed) is not None
    assert tier.get(key(3), removed) is not None
    tier.invalidate("n", None, removed)
    assert tier.get(key(3), removed) is None
    assert removed.invalidated == 2


def test_disk_survives_reopening_and_stays_within_its_bytes(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "cache" / "responses.sqlite"
    tier = DiskTier(path, 20_000, clock=clock)
    removed = Removed()
    for i in range(30):
        clock.now += 1
        tier.put(key(i), entry(bytes([i]) * 1_000, clock), removed)
        tier.touch(key(0))  # a hot entry outlives its neighbours
    assert tier.usage[0] <= 20_000
    assert removed.size > 0
    tier.close()
    assert path.stat().st_mode & 0o777 == 0o600
    again = DiskTier(path, 20_000, clock=clock)
    assert again.usage[1] == len(sqlite3.connect(path).execute("SELECT key FROM entries").fetchall())
    assert again.get(key(0)) is not None
    assert again.get(key(1)) is None
    found = again.get(key(29))
    assert found is not None
    assert found.value == bytes([29]) * 1_000
    assert found.model == "m"
    clock.now += 61
    assert again.get(key(29)) is None  # expired
    again.close()


def test_disk_invalidation_and_eviction_of_the_expired_first(tmp_path: Path) -> None:
    clock = Clock()
    tier = DiskTier(tmp_path / "c.sqlite", 10_200, clock=clock)  # 9 entries
    removed = Removed()
    tier.put(key(1), entry(b"a" * 1_000, clock, tag="t1", ttl=1), removed)
    tier.put(key(2), entry(b"b" * 1_000, clock, tag="t2"), removed)
    tier.invalidate("m", "t2", removed)
    assert removed.invalidated == 1
    assert tier.usage[1] == 1
    tier.put(key(3), entry(b"c" * 1_000, clock, ttl=1), removed)
    clock.now += 2
    for i in range(4, 12):
        tier.put(key(i), entry(bytes(1_000), clock), removed)
    assert removed.expired == 1
    assert tier.get(key(2)) is not None
    tier.close()


def test_disk_values_are_sealed_and_a_foreign_key_drops_them(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "c.sqlite"
    first = new_key()
    tier = DiskTier(path, 100_000, Keyring.parse(f"k1:{first}"), clock)
    secret = b"the answer for tenant acme: 42"
    tier.put(key(1), entry(secret, clock), Removed())
    tier.close()
    assert secret not in b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.is_file())
    plain = DiskTier(tmp_path / "plain" / "c.sqlite", 100_000, clock=clock)
    plain.put(key(1), entry(secret, clock), Removed())
    plain.close()
    assert secret in (tmp_path / "plain" / "c.sqlite").read_bytes()  # what the keyring hides
    rotated = DiskTier(path, 100_000, Keyring.parse(f"k2:{new_key()},k1:{first}"), clock)
    found = rotated.get(key(1))
    assert found is not None
    assert found.value == secret
    rotated.close()
    stranger = DiskTier(path, 100_000, Keyring.parse(f"k3:{new_key()}"), clock)
    assert stranger.usage[1] == 0
    assert stranger.get(key(1)) is None
    stranger.close()


def test_disk_refuses_a_value_moved_to_another_key(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "c.sqlite"
    tier = DiskTier(path, 100_000, Keyring.parse(f"k1:{new_key()}"), clock)
    tier.put(key(1), entry(b"for key one", clock), Removed())
    tier.put(key(2), entry(b"for key two", clock), Removed())
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE entries SET value = (SELECT value FROM entries WHERE key = ?) WHERE key = ?", (key(1), key(2))
    )
    db.commit()
    assert tier.get(key(2)) is None
    found = tier.get(key(1))
    assert found is not None
    assert found.value == b"for key one"
    tier.close()


def test_the_disk_tiers_size_read_from_another_thread_is_one_a_write_left(tmp_path: Path) -> None:
    """The node's status route reads the disk tier's size on the event loop while the cache's writer thread
    puts entries past the bound and evicts: it sees the size a write left, within the bound. Before, it
    saw the count of a put still under way, over the bound until its eviction was done (23,772 bytes
    of 22,640, every run)."""
    clock, size = Clock(), 1_000 + 32 + ROW_OVERHEAD
    tier = DiskTier(tmp_path / "cache.sqlite", 20 * size, clock=clock)

    def read() -> None:
        total, count = tier.usage
        if total > tier.max_bytes or total != count * size:
            raise AssertionError(f"{total} bytes for {count} entries read, over the bound or torn")

    def write() -> None:
        for i in range(300):
            tier.put(key(i), entry(bytes(1_000), clock), Removed())

    assert read_while_written(read, write) == []
    assert tier.usage == (len(tier_keys(tmp_path)) * size, len(tier_keys(tmp_path)))


def tier_keys(tmp_path: Path) -> list[bytes]:
    return [row[0] for row in sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT key FROM entries")]


def test_the_disk_bound_holds_for_the_file_whichever_worker_process_writes(tmp_path: Path) -> None:
    """A node's worker processes share the disk tier's file, each with a tier of its own: the file stays
    within its bound whoever writes, and each tier's size is the file's. Before, each counted only its
    own writes from what it measured at open: two of them let the file grow towards twice the bound."""
    clock, size = Clock(), 1_000 + 32 + ROW_OVERHEAD
    path = tmp_path / "cache.sqlite"
    workers = [DiskTier(path, 20 * size, clock=clock) for _ in range(2)]
    for i in range(120):
        clock.now += 1
        writer = workers[i % 2 if i < 60 else 0]  # both, then one alone (the other still counts it)
        writer.put(key(i), entry(bytes(1_000), clock), Removed())
        stored = sqlite3.connect(path).execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM entries")
        total, count = stored.fetchone()
        assert total <= 20 * size
        assert writer.usage == (total, count)
