"""The bounded memory of repeated answers (memo.py): what it holds, and that it never holds more."""

from __future__ import annotations

from edgegen.memo import Memo


def test_a_memo_remembers_until_full_then_starts_over() -> None:
    seen: Memo[str, int] = Memo(3)
    assert [seen.remember(k, n) for n, k in enumerate("abc")] == [0, 1, 2]
    assert (seen.get("a"), seen.get("c"), seen.get("z")) == (0, 2, None)
    assert seen.remember("d", 3) == 3  # a fourth: the three before are forgotten
    assert dict(seen) == {"d": 3}
    for n in range(1000):
        seen.remember(f"k{n}", n)
        assert len(seen) <= 3
