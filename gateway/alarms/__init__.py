"""Alarm semantics on the gateway: model anomaly episodes and limit alarms.

Pure state machines, no I/O: :mod:`gateway.alarms.episodes` turns per-window verdicts
(anomalous / normal / indeterminate) into one alarm per episode; :mod:`gateway.alarms.limits`
raises IEC 60601-1-8 / ISA-18.2 style limit alarms on single streams.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.contracts import Alarm, AlarmKind, AlarmPriority

__all__ = ["DEFAULT_PRIORITY", "with_priority"]

#: Priorities of alarms whose raiser did not set one.  A model's anomaly asks for a prompt look
#: (medium); a sensor that cannot measure is a low-priority technical alarm, a whole device gone
#: a medium one.  Kinds that end a condition (cleared, restored) carry none.
DEFAULT_PRIORITY: dict[AlarmKind, AlarmPriority] = {
    AlarmKind.ANOMALY: AlarmPriority.MEDIUM,
    AlarmKind.ANOMALY_INDETERMINATE: AlarmPriority.LOW,
    AlarmKind.SENSOR_LOST: AlarmPriority.LOW,
    AlarmKind.SENSOR_FAULT: AlarmPriority.LOW,
    AlarmKind.DEVICE_LOST: AlarmPriority.MEDIUM,
}


def with_priority(alarm: Alarm) -> Alarm:
    """The alarm with its kind's default priority when it has none."""
    if alarm.priority is not None or alarm.kind not in DEFAULT_PRIORITY:
        return alarm
    return replace(alarm, priority=DEFAULT_PRIORITY[alarm.kind])
