"""Load balancers: which node takes the next request. Pure: a function of the nodes' state and the key.

    Balancer.pick(nodes, key) -> Backend      nodes: the ones that may take traffic now (never empty)

The proxy owns each `Backend`'s counters (requests in flight, latency EWMA) and updates them around
every request; a balancer only reads them, plus its own small state (a cursor, smooth weights, a
hash ring). Five of them:

    round_robin           each node in turn
    weighted_round_robin  nginx's smooth weighted round robin: shares follow the weights, interleaved
    least_connections     fewest requests in flight per unit of weight (ties: in turn)
    p2c_ewma              two nodes at random, the one with the lower (in flight + 1) × latency EWMA
    prefix_affinity       consistent hashing of the request's key (prompt prefix, session) so a chat
                          returns to the node whose KV cache holds its prefix; when that node carries
                          more than `load_factor` × the mean load (+1), the next on the ring that does not

No pick scans the fleet: weighted round robin keeps one heap per distinct weight, least connections
a heap of loads and prefix affinity a running total (both told of every load change), and the ring
lookup is O(log ring).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(eq=False)
class Backend:
    """One node as the balancers see it. The proxy calls acquire() / release() around each request."""

    name: str
    url: str
    weight: int = 1
    in_flight: int = 0
    ewma_s: float = 0.0  # time to response headers, exponentially weighted
    # Told of every change of `in_flight` (least connections keeps its index with them).
    watchers: list[Callable[[Backend], None]] = field(default_factory=list, repr=False)

    def acquire(self) -> None:
        self.in_flight += 1
        for watch in self.watchers:
            watch(self)

    def release(self) -> None:
        self.in_flight -= 1
        for watch in self.watchers:
            watch(self)

    def observe(self, seconds: float, alpha: float = 0.3) -> None:
        self.ewma_s = seconds if self.ewma_s == 0.0 else (1 - alpha) * self.ewma_s + alpha * seconds


class Balancer(Protocol):
    name: str

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        chosen = nodes[self._next % len(nodes)]
        self._next = (self._next + 1) % len(nodes)
        return chosen


class WeightedRoundRobin:
    """nginx's smooth weighted round robin, without its scan: weights 5, 1, 1 give a a b a c a a.

    nginx adds each node's weight to its score, takes the highest (the first of equals) and takes the
    total weight off it. After t picks a node's score is t·w − W·k (k: its picks so far), so among
    nodes of one weight the highest is the one picked least (then the first): one heap per distinct
    weight, and a pick compares only the heads — O(distinct weights + log n), the same sequence.
    """

    name = "weighted_round_robin"

    def __init__(self) -> None:
        self._nodes: Sequence[Backend] | None = None
        self._groups: dict[int, list[tuple[int, int, Backend]]] = {}  # weight → heap of (picks, order, node)
        self._picks = 0
        self._total = 0

    def _rebuild(self, nodes: Sequence[Backend]) -> None:
        self._nodes, self._picks = nodes, 0
        self._total = sum(node.weight for node in nodes)
        self._groups = {}
        for order, node in enumerate(nodes):
            self._groups.setdefault(node.weight, []).append((0, order, node))

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        if nodes is not self._nodes:
            self._rebuild(nodes)  # the fleet hands out a new sequence on every change, weights included
        self._picks += 1
        best: tuple[int, int, list[tuple[int, int, Backend]]] | None = None
        for weight, heap in self._groups.items():
            picked, order, _ = heap[0]
            score = self._picks * weight - self._total * picked
            if best is None or score > best[0] or (score == best[0] and order < best[1]):
                best = (score, order, heap)
        assert best is not None
        heap = best[2]
        picked, order, node = heap[0]
        heapq.heapreplace(heap, (picked + 1, order, node))
        return node


class LeastConnections:
    """Fewest requests in flight per unit of weight, in O(log n): a heap of loads, told of every change.

    Each change of a node's load pushes a fresh entry; entries older than their node's latest are
    skipped when they reach the top, and the heap is rebuilt when stale ones outnumber live ones 4 to 1.
    Equal loads take turns: the node picked goes behind its equals.
    """

    name = "least_connections"

    def __init__(self) -> None:
        self._nodes: Sequence[Backend] | None = None
        self._heap: list[tuple[float, int, Backend]] = []
        self._latest: dict[int, int] = {}  # id(node) → the tick of its live entry
        self._ticks = itertools.count()

    def _push(self, node: Backend) -> None:
        tick = next(self._ticks)
        self._latest[id(node)] = tick
        heapq.heappush(self._heap, (node.in_flight / node.weight, tick, node))

    def _changed(self, node: Backend) -> None:
        self._push(node)
        if len(self._heap) > 4 * len(self._latest) + 64:
            live = [(n.in_flight / n.weight, t, n) for _, t, n in self._heap if self._latest[id(n)] == t]
            heapq.heapify(live)
            self._heap = live

    def _rebuild(self, nodes: Sequence[Backend]) -> None:
        for old in self._nodes or ():
            old.watchers.remove(self._changed)
        self._nodes = nodes
        self._heap, self._latest = [], {}
        for node in nodes:
            self._push(node)
            node.watchers.append(self._changed)

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        if nodes is not self._nodes:
            self._rebuild(nodes)  # the fleet changed: it hands out a new sequence on every change
        heap, latest = self._heap, self._latest
        while latest[id(heap[0][2])] != heap[0][1]:
            heapq.heappop(heap)
        node = heap[0][2]
        heapq.heappop(heap)
        self._push(node)  # behind its equals
        return node


class P2cEwma:
    """Power of two choices on (in flight + 1) × latency EWMA: load and speed, without scanning all nodes."""

    name = "p2c_ewma"

    def __init__(self, rng: random.Random | None = None) -> None:
        # Choosing nodes, not secrets: a seeded PRNG is right here.
        self._rng = rng or random.Random()  # nosec B311

    @staticmethod
    def cost(node: Backend) -> float:
        # An unmeasured node costs as if it were as fast as possible: it gets tried, then measured.
        return (node.in_flight + 1) * max(node.ewma_s, 1e-6) / node.weight

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        if len(nodes) == 1:
            return nodes[0]
        i, j = self._rng.sample(range(len(nodes)), 2)
        a, b = nodes[i], nodes[j]
        return a if self.cost(a) <= self.cost(b) else b


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class PrefixAffinity:
    """Consistent hashing with bounded load (Mirrokni et al., 2018) on the request's affinity key.

    A request without a key (nothing to be affine to) goes to the least-loaded node.
    """

    name = "prefix_affinity"

    def __init__(self, replicas: int = 64, load_factor: float = 1.25) -> None:
        self.replicas = replicas
        self.load_factor = load_factor
        self._ring: list[int] = []
        self._owners: list[str] = []
        self._nodes: Sequence[Backend] | None = None
        self._by_name: dict[str, Backend] = {}
        self._seen: dict[str, int] = {}
        self._total = 0
        self._fallback = LeastConnections()

    def _rebuild(self, nodes: Sequence[Backend]) -> None:
        points = sorted(
            (_point(f"{node.name}#{r}".encode()), node.name) for node in nodes for r in range(self.replicas)
        )
        self._ring = [p for p, _ in points]
        self._owners = [name for _, name in points]
        for old in self._nodes or ():
            old.watchers.remove(self._changed)
        self._nodes = nodes
        self._by_name = {node.name: node for node in nodes}
        # The fleet's total load, kept current by the nodes' changes: the bound costs no scan.
        self._seen = {node.name: node.in_flight for node in nodes}
        self._total = sum(self._seen.values())
        for node in nodes:
            node.watchers.append(self._changed)

    def _changed(self, node: Backend) -> None:
        self._total += node.in_flight - self._seen[node.name]
        self._seen[node.name] = node.in_flight

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        if key is None or len(nodes) == 1:
            return self._fallback.pick(nodes)
        if nodes is not self._nodes:
            self._rebuild(nodes)  # the fleet changed (a node joined, left or was ejected)
        by_name = self._by_name
        bound = self.load_factor * self._total / len(nodes) + 1
        start = bisect.bisect(self._ring, _point(key)) % len(self._ring)
        seen: set[str] = set()
        for i in range(len(self._ring)):
            name = self._owners[(start + i) % len(self._ring)]
            if name in seen:
                continue
            seen.add(name)
            node = by_name[name]
            if node.in_flight < bound:
                return node
            if len(seen) == len(nodes):
                break
        return self._fallback.pick(nodes)

    def home(self, nodes: Sequence[Backend], key: bytes) -> Backend:
        """The node that owns `key` on the ring, whatever its load."""
        if nodes is not self._nodes:
            self._rebuild(nodes)
        return self._by_name[self._owners[bisect.bisect(self._ring, _point(key)) % len(self._ring)]]


BALANCERS: dict[str, type[RoundRobin | WeightedRoundRobin | LeastConnections | P2cEwma | PrefixAffinity]] = {
    cls.name: cls for cls in (RoundRobin, WeightedRoundRobin, LeastConnections, P2cEwma, PrefixAffinity)
}


def make_balancer(name: str) -> Balancer:
    return BALANCERS[name]()
