"""Intrusion guard: a client that keeps failing authentication, or probes for what is not there, is
banned for a while. Pure: a function of the events and a clock passed in.

    guard = IntrusionGuard(max_failures=10, window_s=60, ban_s=300)
    guard.failure(client, now)            # a refused credential, or a probe (looks_like_scanning);
                                          # True when this one bans the client
    guard.banned_for(client, now)         # seconds of ban left, 0.0 when free to go

Failures are counted in a sliding window per client; a ban lasts `ban_s`, doubling for each new ban of
the same client (up to `max_ban_s`). Clients are kept in insertion order and the oldest dropped beyond
`max_clients`, so a flood of addresses cannot exhaust memory.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field

# What scanners ask for and an edgegen node never serves (case-insensitive; see `looks_like_scanning`).
SCAN_PATTERNS = re.compile(
    r"(\.\./|\.\.\\|%2e%2e|%252e|/\.env|/\.git|/wp-(admin|login)|/etc/passwd|/cgi-bin|/actuator|/phpmyadmin"
    r"|/server-status|/\.aws|\x00|%00)",
    re.IGNORECASE,
)


def looks_like_scanning(raw_path: bytes, path: str, query: bytes) -> bool:
    """Whether a request asks for what scanners ask for: on the path as sent, on its decoded reading
    (so `/%2eenv` is `/.env`) and on the query string.

    >>> looks_like_scanning(b"/%2eenv", "/.env", b"")
    True
    """
    return bool(
        SCAN_PATTERNS.search(raw_path.decode("latin-1"))
        or SCAN_PATTERNS.search(path)
        or (query and SCAN_PATTERNS.search(query.decode("latin-1")))
    )


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0
    bans: int = 0


class IntrusionGuard:
    def __init__(
        self,
        max_failures: int = 10,
        window_s: float = 60.0,
        ban_s: float = 300.0,
        max_ban_s: float = 86_400.0,
        max_clients: int = 100_000,
    ) -> None:
        self.max_failures, self.window_s = max_failures, window_s
        self.ban_s, self.max_ban_s, self.max_clients = ban_s, max_ban_s, max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.bans = 0  # for metrics

    def _client(self, key: str) -> _Client:
        state = self._clients.get(key)
        if state is None:
            state = self._clients[key] = _Client()
            if len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        return state

    def banned_for(self, key: str, now: float) -> float:
        state = self._clients.get(key)
        return max(0.0, state.banned_until - now) if state is not None else 0.0

    def failure(self, key: str, now: float) -> bool:
        """Count one failure; True when it bans the client."""
        state = self._client(key)
        if state.banned_until > now:
            return False
        failures = state.failures
        failures.append(now)
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if len(failures) < self.max_failures:
            return False
        state.bans += 1
        state.banned_until = now + min(self.ban_s * 2 ** (state.bans - 1), self.max_ban_s)
        failures.clear()
        self.bans += 1
        return True

    def __len__(self) -> int:
        return len(self._clients)
