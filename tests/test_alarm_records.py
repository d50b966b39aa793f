"""Alarm semantics in the record: class, priority, limit, value and time held survive SenML-CBOR."""

from __future__ import annotations

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Alarm, AlarmKind, AlarmPriority
from gateway.records import as_map, decode, encode
from gateway.sample import MDC, Stream

SPO2 = Stream("bed7-ox", "MRN-0042", "00:1C:05:AA:BB:CC", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)


def roundtrip(alarm: Alarm) -> dict[str, object]:
    anon = Anonymizer(Pseudonymizer(b"r" * 32), time_mode="relative", start_wall=1.7e9)
    rec = anon.alarm(alarm)
    data = encode(rec.payload)
    anon.check(data)
    return as_map(decode(data))


def test_a_limit_alarm_carries_its_priority_limit_value_and_time_held() -> None:
    got = roundtrip(
        Alarm(
            AlarmKind.LIMIT,
            "MRN-0042",
            10.0,
            1.7e9 + 10.0,
            SPO2,
            {"level": "low"},
            priority=AlarmPriority.MEDIUM,
            limit=90.0,
            value=86.0,
            held_s=10.4,
        )
    )
    assert got["alarm"] == "limit"
    assert (got["class"], got["priority"], got["limit"], got["value"], got["held_s"]) == (
        "physiological",
        "medium",
        90.0,
        86.0,
        10.4,
    )
    assert got["metric"] == "MDC_PULS_OXIM_SAT_O2"
    assert got["detail"] == {"level": "low"}
    assert "MRN-0042" not in repr(got)


def test_technical_alarms_are_never_taken_for_physiological_ones() -> None:
    fault = roundtrip(Alarm(AlarmKind.SENSOR_FAULT, "MRN-0042", 1.0, 1.7e9, SPO2, {"quality": 1}))
    assert fault["class"] == "technical"
    device = roundtrip(Alarm(AlarmKind.DEVICE_LOST, "MRN-0042", 1.0, 1.7e9, SPO2, {"streams": 3}))
    assert device["class"] == "technical"
    assert "dev" in device
    assert "metric" not in device  # names the device, not one of its streams
    anomaly = roundtrip(Alarm(AlarmKind.ANOMALY, "pump-3", 1.0, 1.7e9, subject_kind="industrial"))
    assert anomaly["class"] == "process"
    assert "priority" not in anomaly  # set by the pipeline (tests/test_alarm_episodes.py), not invented here
