"""Low-limit alarms on estimates (low SoC, low health, little life left), with a clearing deadband."""

from __future__ import annotations

from collections.abc import Callable

from gateway.contracts import Alarm, AlarmKind, AlarmPriority

__all__ = ["LowLimits"]


class LowLimits:
    """Raises a ``limit`` alarm when an estimate falls below its limit, clears it ``deadband`` above."""

    def __init__(self, subject: str, kind: str, alarm: Callable[[Alarm], None], deadband: float) -> None:
        self.subject = subject
        self.kind = kind
        self._alarm = alarm
        self.deadband = deadband
        self.raised: set[str] = set()

    def resume(self, name: str) -> None:
        """``name``'s alarm a previous run left on: the first estimate back above by the deadband clears it."""
        self.raised.add(name)

    def check(
        self, name: str, value: float, limit: float, priority: str, t_mono: float, t_wall: float
    ) -> None:
        """Compare one estimate with its limit; alarm on crossing it either way."""
        if name not in self.raised and value < limit:
            self.raised.add(name)
            kind = AlarmKind.LIMIT
        elif name in self.raised and value >= limit + self.deadband:
            self.raised.discard(name)
            kind = AlarmKind.LIMIT_CLEARED
        else:
            return
        self._alarm(
            Alarm(
                kind,
                self.subject,
                t_mono,
                t_wall,
                detail={"estimate": name, "level": "low"},
                priority=AlarmPriority(priority),
                limit=limit,
                value=value,
                subject_kind=self.kind,
            )
        )
