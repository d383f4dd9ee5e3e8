"""Draft tokens for speculative decoding, looked up in the sequence's own text (prompt lookup decoding).

A model that summarises, edits or quotes a given text writes long runs of tokens that are already in its
prompt or its answer so far. The last few tokens written are looked up in what came before; where they
occurred, the tokens that followed them are a guess at what comes next. The scheduler feeds the guesses
through the model in the same step as the real token and keeps them only as far as the model, sampled as
it would have been anyway, agrees (`engine/generation.py`): the answer is the same as without drafts.

    >>> lookup = PromptLookup([5, 6, 7, 8, 9, 5, 6])
    >>> lookup.draft(3)  # …5, 6 was followed by 7, 8, 9
    [7, 8, 9]
    >>> lookup.extend([7]); lookup.draft(3)  # the longest match wins: 5, 6, 7 at the start
    [8, 9, 5]

Each n-gram is indexed once, in a dict from its tokens to where its latest earlier occurrence ends, so a
step costs a few dict operations whatever the length of the text.
"""

from __future__ import annotations

from collections.abc import Sequence

# Match lengths tried, longest first: a one-token match guesses too often wrong to pay for its drafts.
LONGEST, SHORTEST = 4, 2


class PromptLookup:
    def __init__(self, tokens: Sequence[int]) -> None:
        self._tokens: list[int] = []
        # n-gram -> the end of its latest occurrence, for every n-gram that ends before the text does
        self._ends: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """The text grew by `tokens`."""
        text = self._tokens
        for token in tokens:
            end = len(text)  # the n-grams ending here become earlier occurrences once one more follows
            for n in range(SHORTEST, LONGEST + 1):
                if end >= n:
                    self._ends[tuple(text[end - n : end])] = end
            text.append(token)

    def draft(self, most: int) -> list[int]:
        """Up to `most` tokens that followed the longest earlier occurrence of the text's last tokens."""
        text = self._tokens
        for n in range(min(LONGEST, len(text)), SHORTEST - 1, -1):
            end = self._ends.get(tuple(text[len(text) - n :]))
            if end is not None:
                return text[end : end + most]
        return []
