"""How many tokens one decode step may carry so that running streams keep their pace (Sarathi-Serve's
token budget, learned instead of profiled).

A step's time grows with the tokens it carries: the running streams' one token each, then chunks of the
prompts being prefilled. While streams run, every one of them waits for the whole step, so the step is
kept near the inter-token latency target (`[llm] itl_target_ms`) by limiting its prompt tokens. The
limit is learned from the steps themselves: a step of n tokens that took t seconds suggests n·target/t
tokens for the target. That is the fixed-point iteration of t(n) = target; with t(n) = a + b·n and a > 0
it overshoots nowhere and converges within a few steps of chunks that filled the room, so the budget
follows the machine (its speed, other load, the prompt lengths' attention cost) without a profile.

Which steps teach: one whose prompt chunks filled the room (the budget itself was tried), or one that
took longer than the target (n·target/t is then an upper bound of the answer, taken at once). A short
step that did not fill the room says only that the answer is at least n·target/t, so it can raise the
budget, never lower it. The first step sets the budget from nothing.
"""

from __future__ import annotations

# Prompt tokens a step takes even when the running streams alone fill the target: waiting prompts
# always move on (about 25 ms of SmolLM2-135M's prefill on 2 cores).
MIN_PREFILL = 8
_SMOOTHING = 0.5  # weight of the newest step that raises the budget


class StepBudget:
    def __init__(self, target_s: float, most: int) -> None:
        """`target_s` 0: no target, a step takes up to `most` tokens (n_batch)."""
        self.target_s = target_s
        self.most = most
        self.tokens: float | None = None  # tokens a step may carry; None until the first step is seen

    def room(self, decoding: int) -> int:
        """Prompt tokens the next step may take beside `decoding` running streams' tokens."""
        free = self.most - decoding
        if self.target_s == 0 or decoding == 0 or self.tokens is None:
            return free  # no stream waits on this step (or nothing is known yet)
        return max(min(MIN_PREFILL, free), min(free, int(self.tokens) - decoding))

    def spare(self, planned: int) -> int:
        """Tokens a step already carrying `planned` may take besides and stay within the target: what
        speculative drafts may use (unlike prompts, which always move on by at least MIN_PREFILL)."""
        if self.target_s == 0 or self.tokens is None:
            return self.most - planned
        return max(0, min(self.most, int(self.tokens)) - planned)

    def observe(self, tokens: int, seconds: float, *, filled: bool) -> None:
        """A step of `tokens` took `seconds`; `filled`: its prompt chunks used all the room it had."""
        if self.target_s == 0 or tokens <= 0 or seconds <= 0:
            return
        estimate = tokens * self.target_s / seconds
        if self.tokens is None or seconds > self.target_s:
            # Too long: the estimate bounds the answer from above; the streams' gaps matter more than
            # the prompt's pace, so the budget drops at once (and climbs back by halves).
            self.tokens = estimate if self.tokens is None else min(self.tokens, estimate)
        elif filled or estimate > self.tokens:
            self.tokens += _SMOOTHING * (estimate - self.tokens)
        self.tokens = min(max(self.tokens, 1.0), float(self.most))


class StepCost:
    """What a decode step costs, learned from the small steps just run: t(n) = a + b·n for n tokens.

    Speculative drafts are worth their tokens only while the time they add (b each) buys more tokens than
    the step would have given in that time (`Scheduler._drafts`). The fit is a least-squares line over
    the recent steps of at most `SMALL` tokens (decode steps, with drafts or short prompt chunks: long
    prefill chunks pay attention costs a line does not describe), each older step weighing `_DECAY` less.
    Until the steps' sizes spread enough to fit a slope, the fixed part is taken as `_PRIOR_FIXED` tokens'
    worth (SmolLM2-135M on 2 cores: 18 ms fixed, 5.6 ms a token).
    """

    SMALL = 64
    _DECAY = 0.95
    _PRIOR_FIXED = 3.0

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if not 0 < tokens <= self.SMALL or seconds <= 0:
            return
        d = self._DECAY
        self._w = self._w * d + 1
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b) in seconds, or None before any step was seen."""
        if self._w == 0:
            return None
        x, y = self._x / self._w, self._y / self._w
        spread = self._xx / self._w - x * x
        if spread >= 0.25:
            b = (self._xy / self._w - x * y) / spread
            if b > 0:
                return max(y - b * x, 0.0), b
        b = y / (x + self._PRIOR_FIXED)
        return self._PRIOR_FIXED * b, b
