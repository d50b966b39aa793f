"""Token buckets: how fast the backlog replays (messages/s and bytes/s) and the broker's own limits.

Pure: the clock is passed in, so the arithmetic is tested without sleeping.
"""

from __future__ import annotations

import math


class TokenBucket:
    """A bucket of ``burst`` tokens refilled at ``rate`` per second; ``rate`` None never limits."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float | None, burst: float | None = None, *, now: float = 0.0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"token bucket: rate {rate}: it must be positive (or None for no limit)")
        self.rate = rate
        # A burst of one second's worth by default: smooth enough, and never below one token.
        self.burst = max(1.0, burst if burst is not None else (rate or 1.0))
        self._tokens = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def available(self, now: float) -> float:
        """Tokens that can be taken now (infinite without a rate)."""
        if self.rate is None:
            return math.inf
        self._refill(now)
        return self._tokens

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` tokens are there (0 when they are).

        An amount above the burst is allowed once the bucket is full, so one oversized message
        cannot block forever.
        """
        if self.rate is None:
            return 0.0
        self._refill(now)
        need = min(amount, self.burst) - self._tokens
        return 0.0 if need <= 0 else need / self.rate

    def take(self, amount: float, now: float) -> None:
        """Take ``amount`` tokens (the balance may go negative: a debt paid by waiting)."""
        if self.rate is None:
            return
        self._refill(now)
        self._tokens -= amount


class Pacer:
    """A messages/s and a bytes/s bucket taken together."""

    __slots__ = ("bytes", "msgs")

    def __init__(self, msgs_per_s: float | None, bytes_per_s: float | None, *, now: float = 0.0) -> None:
        self.msgs = TokenBucket(msgs_per_s, now=now)
        self.bytes = TokenBucket(bytes_per_s, now=now)

    @property
    def unlimited(self) -> bool:
        """True when neither bucket has a rate."""
        return self.msgs.rate is None and self.bytes.rate is None

    def wait_for(self, size: int, now: float) -> float:
        """Seconds until one message of ``size`` bytes may go."""
        return max(self.msgs.wait_for(1, now), self.bytes.wait_for(size, now))

    def take(self, size: int, now: float) -> None:
        """Account one message of ``size`` bytes."""
        self.msgs.take(1, now)
        self.bytes.take(size, now)
