from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgegen.optimize.plots import pareto

point = st.tuples(st.floats(0.001, 1000), st.floats(0, 1))


@given(st.lists(point, min_size=1, max_size=20))
def test_the_front_is_exactly_the_undominated_points(points: list[tuple[float, float]]) -> None:
    front = set(pareto(points))
    for i, (cost, accuracy) in enumerate(points):
        beaten = any(
            c <= cost and a >= accuracy and (c, a) != (cost, accuracy)
            for j, (c, a) in enumerate(points)
            if j != i
        )
        assert (i in front) == (not beaten)


def test_a_cheaper_and_more_accurate_point_removes_the_other() -> None:
    assert pareto([(2.0, 0.9), (1.0, 0.95), (3.0, 0.99)]) == [1, 2]
