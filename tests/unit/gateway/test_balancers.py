"""Every balancer, pinned by properties over random fleets."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from edgegen.gateway.balancers import (
    Backend,
    LeastConnections,
    P2cEwma,
    PrefixAffinity,
    RoundRobin,
    WeightedRoundRobin,
    make_balancer,
)


def fleet(weights: list[int], loads: list[int] | None = None) -> list[Backend]:
    loads = loads or [0] * len(weights)
    return [
        Backend(name=f"n{i}", url=f"http://127.0.0.1:{9000 + i}", weight=w, in_flight=c)
        for i, (w, c) in enumerate(zip(weights, loads, strict=True))
    ]


@given(st.integers(1, 20))
def test_round_robin_visits_each_node_once_per_cycle(n: int) -> None:
    nodes = fleet([1] * n)
    balancer = RoundRobin()
    for _ in range(3):
        assert Counter(balancer.pick(nodes).name for _ in range(n)) == Counter(node.name for node in nodes)


@given(st.lists(st.integers(1, 10), min_size=1, max_size=8), st.integers(1, 4))
def test_weighted_round_robin_gives_exact_shares_every_cycle(weights: list[int], cycles: int) -> None:
    nodes = fleet(weights)
    balancer = WeightedRoundRobin()
    total = sum(weights)
    picks = [balancer.pick(nodes).name for _ in range(total * cycles)]
    for c in range(cycles):
        counts = Counter(picks[c * total : (c + 1) * total])
        assert [counts[node.name] for node in nodes] == weights
    # Smooth: within any prefix, no node runs ahead of its share by a whole request or more.
    running: Counter[str] = Counter()
    for k, name in enumerate(picks, start=1):
        running[name] += 1
        for node in nodes:
            assert running[node.name] - k * node.weight / total < 1


def nginx_smooth_wrr(weights: list[int], picks: int) -> list[int]:
    """nginx's ngx_http_upstream_get_peer, as written there: the reference the heap version must equal."""
    current = [0] * len(weights)
    order = []
    for _ in range(picks):
        best = None
        for i, w in enumerate(weights):
            current[i] += w
            if best is None or current[i] > current[best]:
                best = i
        assert best is not None
        current[best] -= sum(weights)
        order.append(best)
    return order


@given(st.lists(st.integers(1, 12), min_size=1, max_size=20), st.integers(1, 200))
def test_weighted_round_robin_is_nginxs_sequence(weights: list[int], picks: int) -> None:
    nodes = fleet(weights)
    balancer = WeightedRoundRobin()
    index = {node.name: i for i, node in enumerate(nodes)}
    assert [index[balancer.pick(nodes).name] for _ in range(picks)] == nginx_smooth_wrr(weights, picks)


def test_weighted_round_robin_interleaves_as_nginx_does() -> None:
    nodes = fleet([5, 1, 1])
    balancer = WeightedRoundRobin()
    letters = {"n0": "a", "n1": "b", "n2": "c"}
    assert "".join(letters[balancer.pick(nodes).name] for _ in range(14)) == "aabacaa" * 2


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 50)), min_size=1, max_size=12))
def test_least_connections_never_picks_a_busier_node(spec: list[tuple[int, int]]) -> None:
    nodes = fleet([w for w, _ in spec], [c for _, c in spec])
    balancer = LeastConnections()
    for _ in range(len(nodes) + 1):
        chosen = balancer.pick(nodes)
        assert all(chosen.in_flight / chosen.weight <= n.in_flight / n.weight for n in nodes)


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=10),
    st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=300),
)
def test_least_connections_stays_exact_as_loads_change(
    weights: list[int], ops: list[tuple[bool, int]]
) -> None:
    nodes = fleet(weights)
    balancer = LeastConnections()
    for start, index in ops:
        if start:
            balancer.pick(nodes).acquire()  # a request starts where the balancer sends it
        else:
            busy = [n for n in nodes if n.in_flight]
            if busy:
                busy[index % len(busy)].release()  # some request ends
        chosen = balancer.pick(nodes)
        assert all(chosen.in_flight / chosen.weight <= n.in_flight / n.weight for n in nodes)


def test_least_connections_takes_turns_among_equals() -> None:
    nodes = fleet([1, 1, 1])
    balancer = LeastConnections()
    assert {balancer.pick(nodes).name for _ in range(3)} == {"n0", "n1", "n2"}


@given(
    st.lists(st.tuples(st.integers(0, 20), st.floats(0.0001, 1.0)), min_size=2, max_size=12),
    st.integers(0, 10_000),
)
def test_p2c_never_picks_the_worse_of_its_two(spec: list[tuple[int, float]], seed: int) -> None:
    nodes = fleet([1] * len(spec), [c for c, _ in spec])
    for node, (_, ewma) in zip(nodes, spec, strict=True):
        node.ewma_s = ewma
    chosen = P2cEwma(random.Random(seed)).pick(nodes)
    i, j = random.Random(seed).sample(range(len(nodes)), 2)  # the same two the balancer drew
    assert chosen in (nodes[i], nodes[j])
    assert P2cEwma.cost(chosen) <= min(P2cEwma.cost(nodes[i]), P2cEwma.cost(nodes[j]))


def test_p2c_steers_away_from_a_slow_node() -> None:
    nodes = fleet([1, 1, 1])
    nodes[2].ewma_s = 0.5
    nodes[0].ewma_s = nodes[1].ewma_s = 0.005
    balancer = P2cEwma(random.Random(0))
    picks = Counter(balancer.pick(nodes).name for _ in range(300))
    assert picks["n2"] == 0  # it can win only when drawn against itself, which p2c never does


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=50, unique=True))
def test_prefix_affinity_sends_a_key_home_and_moves_few_keys_when_a_node_leaves(keys: list[bytes]) -> None:
    nodes = fleet([1] * 4)
    balancer = PrefixAffinity()
    homes = {key: balancer.pick(nodes, key).name for key in keys}
    assert homes == {key: balancer.pick(nodes, key).name for key in keys}  # stable
    remaining = nodes[1:]
    after = {key: balancer.pick(remaining, key).name for key in keys}
    for key in keys:
        if homes[key] != "n0":
            assert after[key] == homes[key]  # only the leaver's keys move


def test_prefix_affinity_leaves_a_busy_home_for_the_next_on_the_ring() -> None:
    nodes = fleet([1] * 3)
    balancer = PrefixAffinity(load_factor=1.25)
    home = balancer.home(nodes, b"system prompt")
    home.in_flight = 10  # mean 3.3: bound 1.25 * 3.3 + 1 = 5.2
    chosen = balancer.pick(nodes, b"system prompt")
    assert chosen is not home
    assert chosen.in_flight < 1.25 * sum(n.in_flight for n in nodes) / 3 + 1


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.binary(min_size=1, max_size=8)), max_size=200),
)
def test_prefix_affinity_keeps_its_load_bound_as_loads_change(ops: list[tuple[bool, int, bytes]]) -> None:
    nodes = fleet([1] * 4)
    balancer = PrefixAffinity(load_factor=1.25)
    for start, index, key in ops:
        if start:
            balancer.pick(nodes, key).acquire()
        elif busy := [n for n in nodes if n.in_flight]:
            busy[index % len(busy)].release()
        chosen = balancer.pick(nodes, key)
        bound = 1.25 * sum(n.in_flight for n in nodes) / len(nodes) + 1
        assert chosen.in_flight < bound


def test_without_a_key_prefix_affinity_balances_by_load() -> None:
    nodes = fleet([1, 1, 1], [3, 0, 2])
    assert PrefixAffinity().pick(nodes).name == "n1"


def test_every_balancer_is_made_by_its_name() -> None:
    for name in ("round_robin", "weighted_round_robin", "least_connections", "p2c_ewma", "prefix_affinity"):
        assert make_balancer(name).name == name
