"""A bounded memory of answers that repeat (a Host's verdict, a path's reading, a certificate's serial).

Clients repeat themselves, so each is worked out once; a hostile one that sends something new every time
must not grow it without bound, so it starts over when full. Starting over costs one recomputation per
entry; an LRU would cost bookkeeping on every hit, which is the hot path.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V]):
    """A dict (`get` stays the C one) that forgets everything when `size` entries are held and one more
    is remembered.

    >>> seen: Memo[str, int] = Memo(2)
    >>> seen.remember("a", 1), seen.remember("b", 2), seen.remember("c", 3), dict(seen)
    (1, 2, 3, {'c': 3})
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: K, value: V) -> V:
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value
