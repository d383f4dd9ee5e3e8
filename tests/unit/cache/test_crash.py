"""SIGKILL a process while it writes to the disk tier: the cache opens again, and every entry in it is
whole (absent is fine, torn is not)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgegen.cache.disk import DiskTier
from edgegen.security.atrest import Keyring, new_key

WRITER = """
import hashlib, os, sys
from pathlib import Path
from edgegen.cache.disk import DiskTier
from edgegen.cache.memory import Entry, Removed
from edgegen.security.atrest import Keyring

tier = DiskTier(Path(sys.argv[1]), 24 * 2**20, Keyring.load())
start = int(sys.argv[2])
print("ready", flush=True)
for i in range(start, start + 100_000):
    body = os.urandom(256 * 1024 + i % 4096)
    value = hashlib.sha256(body).digest() + body
    tier.put(i.to_bytes(32, "little"), Entry(value, "m", "t", 0.0, 1e12), Removed())
"""


@pytest.mark.parametrize("sealed", [False, True])
def test_sigkill_mid_write_leaves_entries_absent_or_whole(tmp_path: Path, sealed: bool) -> None:
    path = tmp_path / "responses.sqlite"
    env = dict(os.environ)
    env.pop("EDGEGEN_ENCRYPTION_KEYS", None)
    if sealed:
        env["EDGEGEN_ENCRYPTION_KEYS"] = f"k1:{new_key()}"
    rng = random.Random(7)
    for run in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(run * 100_000)], env=env, stdout=subprocess.PIPE
        )
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    keys = [row[0] for row in db.execute("SELECT key FROM entries")]
    db.close()
    keyring = Keyring.parse(env["EDGEGEN_ENCRYPTION_KEYS"]) if sealed else None
    tier = DiskTier(path, 24 * 2**20, keyring)
    total, count = tier.usage
    assert len(keys) == count > 10
    assert total <= 24 * 2**20
    for key in keys:
        entry = tier.get(key)
        assert entry is not None
        assert hashlib.sha256(entry.value[32:]).digest() == entry.value[:32]
    tier.close()
