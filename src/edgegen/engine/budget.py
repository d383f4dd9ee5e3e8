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
