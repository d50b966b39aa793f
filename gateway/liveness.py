"""Liveness of supervised units: progress beats and bounded, named waits.

A unit is alive when it made progress recently *or* is inside a wait it declared with a known
bound (connecting with a 10 s timeout, a backoff sleep, a device that takes 5 s to answer).  A
reconnect loop that keeps trying is alive; a unit that neither beats nor waits within a bound is
stalled, and the supervisor cancels and restarts it.  Only a stalled event loop, which no task on
it can notice, stops the watchdog pings to the service manager.

A unit reports into a :class:`Pulse`.  Units that only keep a ``last_beat`` timestamp (the older
heartbeat contract) are judged by :func:`stale_reason` on that timestamp alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Slack past a declared bound before the wait counts as stuck: the code that enforces the bound
#: (a timeout, then its cleanup) needs a moment on a loaded machine to act on it.
WAIT_GRACE_S = 2.0


def stale_reason(last_beat: float, stale_after_s: float, now: float) -> str | None:
    """Why a unit with only a heartbeat timestamp counts as stalled, or None when it is alive."""
    silent = now - last_beat
    if silent > stale_after_s:
        return f"no progress for {silent:.0f} s (allowed {stale_after_s:g} s)"
    return None


class Pulse:
    """A unit's signs of life: :meth:`beat` on progress, :meth:`waiting` around a bounded wait.

    Meant for the event loop's thread; it keeps no lock.  ``last_beat`` is kept as an attribute so
    code written for the plain heartbeat contract (``obj.last_beat = time.monotonic()``) still
    counts as a beat.
    """

    __slots__ = ("_waits", "last_beat", "stale_after_s")

    def __init__(self, stale_after_s: float = 10.0) -> None:
        self.stale_after_s = stale_after_s
        self.last_beat = time.monotonic()
        self._waits: list[tuple[str, float, float]] = []  # (what, bound_s, deadline), innermost last

    def beat(self) -> None:
        """Record progress now."""
        self.last_beat = time.monotonic()

    @contextmanager
    def waiting(self, what: str, bound_s: float) -> Iterator[None]:
        """Declare a wait of at most ``bound_s`` seconds (e.g. a connect with that timeout)."""
        entry = (what, bound_s, time.monotonic() + bound_s)
        self._waits.append(entry)
        try:
            yield
        finally:
            self._waits.remove(entry)
            self.beat()  # the wait ended, however it ended: that is progress

    @property
    def wait(self) -> str | None:
        """What the unit is waiting for right now, or None."""
        return self._waits[-1][0] if self._waits else None

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why the unit counts as stalled, or None when it is alive (progressing or in a bounded wait)."""
        now = time.monotonic() if now is None else now
        if self._waits:
            what, bound_s, deadline = self._waits[-1]
            if now <= deadline + WAIT_GRACE_S:
                return None
            return f"{what}: waiting for {now - deadline + bound_s:.0f} s, past its bound of {bound_s:g} s"
        return stale_reason(self.last_beat, self.stale_after_s, now)


class Heartbeat:
    """A unit's heartbeat timestamp beside its :class:`Pulse`, read as "now" inside a bounded wait.

    For units the supervisor judges by a ``heartbeat`` callable (the uplinks): a connection attempt
    against a broker that accepts TCP and never answers is slow but bounded, and must not read as
    stale; a wait that overruns its bound (a bug) goes stale after the bound, as it should.
    """

    def __init__(self, stale_after_s: float) -> None:
        self.pulse = Pulse(stale_after_s=stale_after_s)
        self._beat = time.monotonic()
        self._bounded_until = 0.0  # inside a wait bounded by its own timeout until then

    @property
    def last_beat(self) -> float:
        """Monotonic time of the last sign of life; "now" while inside a bounded wait."""
        now = time.monotonic()
        return now if now < self._bounded_until else self._beat

    def beat(self, now: float) -> None:
        """Progress at ``now`` (monotonic)."""
        self._beat = self.pulse.last_beat = now

    @contextmanager
    def bounded(self, what: str, seconds: float) -> Iterator[None]:
        """Report alive while inside a wait that its own timeouts end within ``seconds``."""
        self._bounded_until = time.monotonic() + seconds
        try:
            with self.pulse.waiting(what, seconds):
                yield
        finally:
            self._bounded_until = 0.0
            self.beat(time.monotonic())
