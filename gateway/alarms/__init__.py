"""Alarm semantics on the gateway: model anomaly episodes and limit alarms.

Pure state machines, no I/O: :mod:`gateway.alarms.episodes` turns per-window verdicts
(anomalous / normal / indeterminate) into one alarm per episode; :mod:`gateway.alarms.limits`
raises IEC 60601-1-8 / ISA-18.2 style limit alarms on single streams.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Literal, Protocol

from gateway.contracts import Alarm, AlarmKind, AlarmPriority
from gateway.sample import Stream

__all__ = ["DEFAULT_PRIORITY", "DeviceOutages", "fold_device_alarm", "with_priority"]

log = logging.getLogger(__name__)

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


class DeviceOutages(Protocol):
    """Who keeps track of device outages (the windower)."""

    def hold_device(self, stream: Stream, t_mono: float | None = None) -> int | None:
        """The device of ``stream`` is lost: streams taken down, or None if already reported."""

    def release_device(self, stream: Stream, t_mono: float) -> int | Literal["repeat", "unknown", "held"]:
        """The device is back: streams returning; "repeat", "unknown", or "held" (restored later)."""


def fold_device_alarm(alarm: Alarm, outages: DeviceOutages) -> Alarm | None:
    """A driver's "device lost / back" as the one device alarm of that outage, or None if a repeat.

    Drivers that watch their link (serial, BLE) report a lost device with one of its streams; the
    windower reports a device whose streams all went silent.  Whichever comes first is the
    incident's alarm, named ``device_lost`` with the number of streams it took down; the other is
    the same incident and is not sent again.  The same for the restore.
    """
    stream = alarm.stream
    if stream is None:
        return alarm
    if alarm.kind is AlarmKind.SENSOR_LOST:
        n = outages.hold_device(stream, alarm.t_mono)
        if n is None:
            log.debug("device %s: lost, as already reported", stream.device)
            return None
        return replace(alarm, kind=AlarmKind.DEVICE_LOST, detail={**alarm.detail, "streams": n})
    if alarm.kind is AlarmKind.SENSOR_RESTORED and alarm.detail.get("after", "sensor_lost") == "sensor_lost":
        back = outages.release_device(stream, alarm.t_mono)
        if back == "repeat":
            log.debug("device %s: back, as already reported", stream.device)
            return None
        if back == "held":
            # Back too soon after the loss: restored once the restore delay is over, never
            # flapping faster than that.
            log.debug("device %s: back within the restore delay; restore held", stream.device)
            return None
        if back == "unknown":
            return alarm
        detail: dict[str, float | str] = {
            **alarm.detail,
            "after": AlarmKind.DEVICE_LOST.value,
            "streams": back,
        }
        return replace(alarm, kind=AlarmKind.DEVICE_RESTORED, detail=detail)
    return alarm
