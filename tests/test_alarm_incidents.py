"""One alarm per incident: a device outage is one technical alarm; on-change streams are not timed out."""

from __future__ import annotations

from gateway.contracts import Alarm, AlarmClass, AlarmKind
from gateway.pipeline.windows import Windower
from gateway.sample import Sample, Stream, industrial_metric


def stream(name: str, rate: float | None = 1.0, *, on_change: bool = False, device: str = "PLC-1") -> Stream:
    return Stream(
        "plc", "pump-3", device, industrial_metric(f"Pump1/{name}", "u"), "industrial", rate, on_change
    )


FLOW, PRESSURE, CURRENT = stream("Flow"), stream("Pressure"), stream("Current")
SLOW = stream("Temperature", 0.1)  # lost only after 3 missed samples (30 s)
RUNNING = stream("Running", None, on_change=True)
OTHER = stream("Flow", device="PLC-2")


def rig() -> tuple[Windower, list[Alarm]]:
    alarms: list[Alarm] = []
    w = Windower(window_s=10.0, hop_s=5.0, grace_s=0.0, lost_after_s=5.0, on_alarm=alarms.append)
    return w, alarms


def put(w: Windower, streams: list[Stream], t0: float, t1: float) -> None:
    t = t0
    while t < t1:
        for s in streams:
            if s.rate_hz is None or (s is SLOW and int(t) % 10):
                continue
            w.put(Sample(s, t, 1.7e9 + t, 1.0))
        t += 1.0


def test_a_plc_outage_is_one_device_alarm_and_one_restore() -> None:
    w, alarms = rig()
    sampled = [FLOW, PRESSURE, CURRENT, SLOW]
    put(w, [*sampled, OTHER], 0.0, 20.0)
    w.put(Sample(RUNNING, 1.0, 1.7e9 + 1.0, 1.0))  # reported once, then holds
    for now in range(20, 60, 2):  # PLC-1 silent from t=20 for 40 s; PLC-2 keeps going
        put(w, [OTHER], now, now + 2)
        w.close_due(float(now + 2), 1.7e9 + now + 2)
    assert [(a.kind, a.detail.get("streams")) for a in alarms] == [(AlarmKind.DEVICE_LOST, 3)]
    lost = alarms[0]
    assert lost.stream is not None
    assert lost.stream.device == "PLC-1"
    assert lost.alarm_class is AlarmClass.TECHNICAL
    # Back: the first sample restores the device; its other streams do not each raise a restore.
    put(w, [*sampled, OTHER], 60.0, 70.0)
    w.close_due(70.0, 1.7e9 + 70.0)
    assert [a.kind for a in alarms] == [AlarmKind.DEVICE_LOST, AlarmKind.DEVICE_RESTORED]
    assert alarms[1].detail == {"after": "device_lost", "streams": 4}  # the slow one had joined it


def test_a_stream_that_does_not_come_back_with_its_device_is_lost_on_its_own() -> None:
    w, alarms = rig()
    put(w, [FLOW, PRESSURE, CURRENT], 0.0, 10.0)
    w.close_due(20.0, 1.7e9 + 20.0)
    put(w, [FLOW, PRESSURE], 20.0, 40.0)  # Current never returns
    for now in range(20, 40, 2):
        w.close_due(float(now + 2), 1.7e9 + now + 2)
    kinds = [(a.kind, a.stream.metric.name if a.stream else None) for a in alarms]
    assert [k for k, _ in kinds] == [AlarmKind.DEVICE_LOST, AlarmKind.DEVICE_RESTORED, AlarmKind.SENSOR_LOST]
    assert kinds[2][1] == "Pump1/Current"
    assert alarms[2].t_mono >= 20.0 + 5.0  # its timeout counts from the device's return


def test_on_change_streams_are_never_timed_out() -> None:
    w, alarms = rig()
    w.put(Sample(RUNNING, 0.0, 1.7e9, 1.0))
    for now in range(0, 600, 5):
        w.close_due(float(now), 1.7e9 + now)
    assert alarms == []


def test_a_lone_silent_stream_is_still_a_sensor_alarm() -> None:
    w, alarms = rig()
    put(w, [FLOW, PRESSURE], 0.0, 10.0)
    put(w, [FLOW], 10.0, 30.0)
    for now in range(10, 30, 2):
        w.close_due(float(now + 2), 1.7e9 + now + 2)
    assert [a.kind for a in alarms] == [AlarmKind.SENSOR_LOST]
