"""Node ticks to gateway time: offset and drift from TIME_SYNC round trips.

A node counts ticks (u32, wrapping) on its own crystal.  The gateway sends its monotonic time,
the node answers with its tick count; the gateway takes the midpoint of send and receive as the
moment the node read its counter.  A least-squares line through recent pairs (the ones with a
short round trip: a long one means the answer sat in a buffer) gives offset and drift.  Pure:
no clock is read here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_WRAP = 1 << 32
_HALF = 1 << 31


@dataclass(frozen=True, slots=True)
class SyncPoint:
    """One round trip: node tick (unwrapped) and the gateway time it maps to."""

    tick: int
    t_mid: float
    rtt: float


class TickUnwrapper:
    """Extends a wrapping u32 counter to an unbounded integer, tolerating slightly older values."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: int | None = None

    def __call__(self, value: int) -> int:
        """The unwrapped value nearest to the latest one seen."""
        if self._last is None:
            self._last = value
            return value
        diff = (value - self._last) % _WRAP
        if diff >= _HALF:
            diff -= _WRAP
        ext = self._last + diff
        self._last = max(self._last, ext)
        return ext

    def reset(self) -> None:
        """Forget the history (the node rebooted)."""
        self._last = None


class ClockSync:
    """Maps node ticks to gateway monotonic seconds."""

    def __init__(self, tick_hz: int, *, window: int = 32, max_drift_ppm: float = 1000.0) -> None:
        if tick_hz <= 0:
            raise ValueError(f"clock sync: tick rate must be positive, not {tick_hz}")
        self.tick_hz = tick_hz
        self.unwrap = TickUnwrapper()
        self._points: deque[SyncPoint] = deque(maxlen=window)
        self._max_drift = max_drift_ppm * 1e-6
        self._x0 = 0
        self._a = 0.0
        self._b = 1.0 / tick_hz
        self.drift_ppm = 0.0

    @property
    def ready(self) -> bool:
        """True once at least one round trip was recorded."""
        return bool(self._points)

    @property
    def rtt_s(self) -> float:
        """The shortest round trip in the window (NaN before the first)."""
        return min((p.rtt for p in self._points), default=float("nan"))

    @property
    def points(self) -> int:
        """Round trips in the window."""
        return len(self._points)

    def add(self, t_send: float, t_recv: float, node_tick: int) -> None:
        """Record one round trip: gateway send/receive times and the node's u32 tick."""
        self._points.append(SyncPoint(self.unwrap(node_tick), (t_send + t_recv) / 2.0, t_recv - t_send))
        self._fit()

    def _fit(self) -> None:
        rtts = sorted(p.rtt for p in self._points)
        # Queued answers carry a long round trip and a late midpoint: keep the quick ones, and at
        # least the quicker half, so a busy host does not leave a single point to fit.
        limit = max(2.0 * rtts[0] + 0.0002, rtts[len(rtts) // 2])
        good = [p for p in self._points if p.rtt <= limit]
        x0 = good[-1].tick
        x = np.array([p.tick - x0 for p in good], np.float64)
        y = np.array([p.t_mid for p in good], np.float64)
        nominal = 1.0 / self.tick_hz
        b = nominal
        span = float(x.max() - x.min()) if len(x) else 0.0
        if len(good) >= 3 and span >= 0.5 * self.tick_hz:
            xm = float(x.mean())
            fitted = float(((x - xm) * (y - y.mean())).sum() / ((x - xm) ** 2).sum())
            # A crystal is off by tens of ppm; anything far beyond is noise in the fit.
            if abs(nominal / fitted - 1.0) <= self._max_drift:
                b = fitted
        self._x0 = x0
        self._b = b
        self._a = float((y - b * x).mean())
        self.drift_ppm = (nominal / b - 1.0) * 1e6

    def to_gateway(self, ticks: npt.NDArray[np.float64] | float) -> npt.NDArray[np.float64]:
        """Gateway monotonic seconds of unwrapped tick values."""
        return np.asarray(self._a + self._b * (np.asarray(ticks, np.float64) - self._x0), np.float64)
