"""The fleet's logs as the gateway serves them: the batches nodes ship, checked and kept; the access lines
read back by the alert analysis (of every worker's batches, with several); the searches; the gateway's
own lines; the purge of old ones (the store: logstore.py).

The store is one SQLite connection, used from worker threads so that the event loop never waits on the
disk, and from one of them at a time (the lock here).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from edgegen.errors import Forbidden, InvalidInput
from edgegen.gateway.alerts import Analyzer
from edgegen.gateway.logstore import LogStore, OwnLines, Query
from edgegen.gateway.settings import LogStoreSettings
from edgegen.security.auth import Principal

# Access lines the analysis reads and counts at a time, in a worker thread that holds the interpreter
# meanwhile: the event loop's longest wait ~6 ms at 2,000 (~18 ms at 10,000), in no more time overall.
ANALYSIS_PAGE = 2_000


class FleetLogs:
    def __init__(self, store: LogStore, analyzer: Analyzer, settings: LogStoreSettings) -> None:
        self.store = store
        self.analyzer = analyzer
        self.settings = settings
        self._lock = asyncio.Lock()
        self._read: int | None = None  # the last line the analysis read (None: none yet)

    async def receive(self, body: bytes, sender: Principal) -> dict[str, int]:
        """A node's batch of log lines, kept. A node that ships with its certificate (`node:<CN>`) ships
        its own lines only."""
        try:
            batch = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidInput("the body must be JSON: {node, spool, entries}") from None
        if not isinstance(batch, dict):
            raise InvalidInput("the body must be a JSON object: {node, spool, entries}")
        node, spool, entries = batch.get("node"), batch.get("spool"), batch.get("entries")
        if not isinstance(node, str) or not 0 < len(node) <= 128 or not node.isprintable():
            raise InvalidInput("node must be a printable name of 1 to 128 characters")
        if not isinstance(spool, str) or not 0 < len(spool) <= 64 or not spool.isalnum():
            raise InvalidInput("spool must be 1 to 64 letters and digits")
        if not isinstance(entries, list) or len(entries) > self.settings.max_batch:
            raise InvalidInput(f"entries must be a list of at most {self.settings.max_batch} lines")
        if sender.subject.startswith("node:") and sender.subject != f"node:{node}":
            raise Forbidden(f"the certificate of {sender.subject[5:]} ships that node's logs, not {node}'s")
        async with self._lock:
            lines = await asyncio.to_thread(self.store.add, node, spool, entries)
        return {"stored": len(lines)}

    async def analyse(self) -> None:
        """The access lines kept since the last round into the analysis (at the first, those of the
        analysis' whole span: a worker that takes the lead takes up the analysis where the last one was).

        Page by page (`ANALYSIS_PAGE`), each read and counted in a worker thread: between pages the store
        is free for the batches nodes ship and for searches, and the event loop never runs the count
        itself. A leader that takes up a span of millions of lines (660 s of a busy fleet) would otherwise
        hold the store, then stop relaying, for seconds (docs/benchmarks.md "2026-12-05")."""
        while True:
            async with self._lock:
                more = await asyncio.to_thread(self._analyse_page)
            if not more:
                return

    def _analyse_page(self) -> bool:
        """One page of unread access lines into the analysis; whether more may wait."""
        if self._read is None:
            self._read = self.store.last_before(self.analyzer.clock() - self.analyzer.span_s)
        lines, self._read = self.store.access_since(self._read, ANALYSIS_PAGE)
        self.analyzer.observe(lines)
        return len(lines) >= ANALYSIS_PAGE

    async def search(self, query: Query) -> list[dict[str, Any]]:
        async with self._lock:
            return await asyncio.to_thread(self.store.query, query)

    async def keep_own(self, handler: OwnLines) -> None:
        """The gateway's own records that wait in `handler`, kept beside the nodes' lines."""
        entries = handler.take()
        if entries:
            async with self._lock:
                await asyncio.to_thread(self.store.add, handler.node, handler.spool, entries)

    async def purge(self) -> int:
        """Drop the lines older than `retention_s`; how many went."""
        async with self._lock:
            before = time.time() - self.settings.retention_s
            return await asyncio.to_thread(self.store.purge, before)

    def close(self) -> None:
        self.store.close()
