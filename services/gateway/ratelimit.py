"""Per-key rate limit: a token bucket for each API key, in this gateway process.

Each key may make `burst` requests at once and `rate_per_s` a second on average; a request
over that is refused with 429 and `Retry-After` (whole seconds until a token is back). With
several gateways each keeps its own buckets, so a key's limit is per gateway replica.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from shared.faults import Rejected

# Buckets kept at most; the least recently used is dropped (a full bucket again: harmless,
# it only forgets a key that has been idle the longest).
_MAX_BUCKETS = 100_000


class RateLimited(Rejected):
    """Too many requests from one key (429); `retry_after_s` says when to try again."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason, 429)
        self.headers = {"Retry-After": str(retry_after_s)}


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> None:
        """Spend one token of `key`'s bucket; RateLimited when it is empty."""
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        if tokens < 1.0:
            wait = math.ceil((1.0 - tokens) / self.rate_per_s)
            self._buckets[key] = (tokens, now)
            raise RateLimited(
                f"rate limit: at most {self.rate_per_s:g} requests/s (bursts of {self.burst}) per API key; "
                f"retry after {wait}s",
                max(wait, 1),
            )
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > _MAX_BUCKETS:
            self._buckets.popitem(last=False)
