"""Sensor faults a driver raised about itself that a previous run left on, judged after the restart.

A driver keeps no state across a restart: a PLC node whose status was bad, or a wearable whose
battery was low, is judged afresh.  Without this the driver would raise such a fault a second
time while it holds, and never end one that ended while the gateway was down.  So, per stream:
the driver raising it again is the same condition (not sent; the driver ends it itself from then
on), and for a node's status (``status``) the stream's first valid sample (flag-free, a value, plausible) shows the node good
again and ends it as the driver would have.  A fault by ``cause`` (a battery, a node's self-test)
has no such evidence in the data: it waits for the driver, whose first reading of the run ends it
when it is good (and after which a raise is a new condition).  A fault raised with no stream (an
OPC UA node that never resolved) is not judged here: nothing in the data can be matched to it;
the fresh driver ends it with the node's first usable value (``gateway.runtime._ends_own_fault``),
and its raise of one the alarm ledger holds on is not sent (``gateway.runtime._raises_unresolved_fault``).
Pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.contracts import Alarm, AlarmKind
from gateway.sample import Stream

__all__ = ["DriverFaults"]


class DriverFaults:
    """The driver-raised faults resumed at the start, by stream key; see the module docstring."""

    def __init__(self) -> None:
        self.resumed: set[str] = set()  # every resumed fault's stream key, until judged
        # The node-status faults among them, ended by their stream's data.  Empty once all are
        # judged: the sample path tests it (a set's truth, ~20 ns) and calls nothing then.
        self.by_data: set[str] = set()

    def resume(self, stream: Stream, detail: Mapping[str, float | str]) -> None:
        """A fault the driver raised for ``stream`` (its kept ``detail``) before the stop."""
        self.resumed.add(stream.key)
        if "status" in detail:
            self.by_data.add(stream.key)

    def forget_source(self, source: str, device: str | None = None) -> None:
        """Drop the faults of every stream of ``source`` (of ``device`` only, when given): they were ended."""
        prefix = f"{source}/" if device is None else f"{source}/{device}/"
        self.resumed = {k for k in self.resumed if not k.startswith(prefix)}
        self.by_data = {k for k in self.by_data if not k.startswith(prefix)}

    def repeat(self, alarm: Alarm) -> bool:
        """True when ``alarm`` raises again a resumed fault: the same condition, not to be sent."""
        if alarm.stream is None or alarm.kind not in (AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED):
            return False
        key = alarm.stream.key
        if alarm.kind is AlarmKind.SENSOR_RESTORED:
            if alarm.detail.get("after") == AlarmKind.SENSOR_FAULT.value:
                # The fresh driver ended it: the next raise is a new condition, not a repeat.
                self.resumed.discard(key)
                self.by_data.discard(key)
            return False
        self.by_data.discard(key)  # the driver judges it from now on
        if key not in self.resumed:
            return False
        self.resumed.discard(key)
        return True

    def data(self, stream: Stream, t_mono: float, t_wall: float) -> Alarm | None:
        """A valid sample of ``stream``: the restore of a resumed node-status fault it shows over, if any."""
        # Valid as every judgement takes it (no unusable flag, a value, plausible): a value the
        # plausibility rules reject is no reading of the node (``gateway.runtime.Pipeline.put``).
        key = stream.key
        if key not in self.by_data:
            return None
        self.by_data.discard(key)
        self.resumed.discard(key)
        detail: dict[str, float | str] = {"after": AlarmKind.SENSOR_FAULT.value, "status": "good"}
        return Alarm(AlarmKind.SENSOR_RESTORED, stream.subject, t_mono, t_wall, stream, detail)
