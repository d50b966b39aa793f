"""Capped, jittered exponential backoff: the one retry policy of every reconnect loop.

A delay grows ``base, 2 base, 4 base ... cap`` and is jittered into ``[nominal/2, nominal]`` so
that gateways (or devices) that lost their peer at the same moment do not all retry in step.
"""

from __future__ import annotations

import random


def nominal_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """The un-jittered delay before retry number ``attempt`` (counting from 1)."""
    return float(min(cap_s, base_s * 2.0 ** min(max(attempt, 1) - 1, 30)))


def jittered(nominal_s: float, rng: random.Random | None = None) -> float:
    """A delay drawn from ``[nominal/2, nominal]``."""
    draw = (rng or random).random()
    return nominal_s / 2 + draw * nominal_s / 2


def delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """The jittered delay before retry number ``attempt`` (counting from 1)."""
    return jittered(nominal_delay(attempt, base_s, cap_s), rng)


class Backoff:
    """A retry loop's backoff state: ``next()`` after each failure, ``reset()`` after a success."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.failures = 0
        self._rng = rng

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        self.failures += 1
        return delay(self.failures, self.min_s, self.max_s, self._rng)

    def reset(self) -> None:
        """An attempt succeeded: start from the minimum again."""
        self.failures = 0


__all__ = ["Backoff", "delay", "jittered", "nominal_delay"]
