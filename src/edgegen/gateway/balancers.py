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

Every pick is O(nodes) at most (the ring lookup is O(log ring)), with no allocation beyond the result.
"""

from __future__ import annotations

import bisect
import hashlib
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(eq=False)
class Backend:
    """One node as the balancers see it."""

    name: str
    url: str
    weight: int = 1
    in_flight: int = 0
    ewma_s: float = 0.0  # time to response headers, exponentially weighted
    # Smooth weighted round robin's running score (nginx's `current_weight`).
    current: int = field(default=0, repr=False)

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
    """Smooth weighted round robin (nginx): weights 5, 1, 1 give a a b a c a a, not a a a a a b c."""

    name = "weighted_round_robin"

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        total = 0
        best = nodes[0]
        for node in nodes:
            node.current += node.weight
            total += node.weight
            if node.current > best.current:
                best = node
        best.current -= total
        return best


class LeastConnections:
    name = "least_connections"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        # Start the scan where the last pick left off, so equal loads take turns.
        n = len(nodes)
        start = self._next % n
        best = nodes[start]
        best_load = best.in_flight / best.weight
        for i in range(1, n):
            node = nodes[(start + i) % n]
            load = node.in_flight / node.weight
            if load < best_load:
                best, best_load = node, load
        self._next = start + 1
        return best


class P2cEwma:
    """Power of two choices on (in flight + 1) × latency EWMA: load and speed, without scanning all nodes."""

    name = "p2c_ewma"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

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


_IN_FLIGHT = operator.attrgetter("in_flight")


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
        self._fallback = LeastConnections()

    def _rebuild(self, nodes: Sequence[Backend]) -> None:
        points = sorted(
            (_point(f"{node.name}#{r}".encode()), node.name) for node in nodes for r in range(self.replicas)
        )
        self._ring = [p for p, _ in points]
        self._owners = [name for _, name in points]
        self._nodes = nodes
        self._by_name = {node.name: node for node in nodes}

    def pick(self, nodes: Sequence[Backend], key: bytes | None = None) -> Backend:
        if key is None or len(nodes) == 1:
            return self._fallback.pick(nodes)
        if nodes is not self._nodes:
            self._rebuild(nodes)  # the fleet changed (a node joined, left or was ejected)
        by_name = self._by_name
        bound = self.load_factor * sum(map(_IN_FLIGHT, nodes)) / len(nodes) + 1
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
        name = self._owners[bisect.bisect(self._ring, _point(key)) % len(self._ring)]
        return next(node for node in nodes if node.name == name)


BALANCERS: dict[str, type[RoundRobin | WeightedRoundRobin | LeastConnections | P2cEwma | PrefixAffinity]] = {
    cls.name: cls for cls in (RoundRobin, WeightedRoundRobin, LeastConnections, P2cEwma, PrefixAffinity)
}


def make_balancer(name: str) -> Balancer:
    return BALANCERS[name]()
