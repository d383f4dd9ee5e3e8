"""Token-bucket rate limits, per API key and per client address. Pure: pass the clock in.

    limiter = RateLimiter(rate=10.0, burst=20)      # 10 requests/s sustained, 20 at once
    wait = limiter.take("key:ab12cd34", now)        # 0.0: go; > 0: answer 429, Retry-After: ceil(wait)

A bucket holds at most `burst` tokens and refills at `rate` per second; a request takes one. Over any
interval of length T a key gets at most burst + rate·T requests. Buckets of keys not seen for a while
are dropped, oldest first, beyond `max_keys` (a flood of new addresses cannot exhaust memory; a dropped
bucket comes back full, which is what an idle key would have anyway once refilled).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens if there are; return 0.0, or the seconds until there will be."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
