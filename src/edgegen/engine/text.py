"""Turning generated tokens into streamed text: UTF-8 across token boundaries, and stop strings.

A token is a few bytes, not always a whole character, and a stop string may arrive split across
several tokens. `TextStream` emits only text that can no longer change: bytes of an unfinished
character wait for the next token, and a tail that could still become a stop string waits until it
either completes one (the stream ends before it) or cannot any more.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now final (maybe empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: flush what was held back (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        if self._stops:
            cut = self._cut(text)
            if cut >= 0:
                self.stopped = True
                self._pending = ""
                return text[:cut]
            if not final:
                hold = self._held_tail(text)
                self._pending = text[len(text) - hold :] if hold else ""
                return text[: len(text) - hold]
        self._pending = ""
        return text

    def _cut(self, text: str) -> int:
        """Where the output ends, or -1: the stop string that completes first wins.

        Deciding by completion, not by start, gives the same answer however the text arrived in
        pieces: as the text grows, the first stop string to appear whole is the one that stops it.
        """
        found = [(i + len(s), i) for s in self._stops if (i := text.find(s)) >= 0]
        if not found:
            return -1
        first_end = min(end for end, _ in found)
        return min(start for end, start in found if end <= first_end)

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
