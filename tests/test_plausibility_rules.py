"""Plausibility rules that tolerate measurement noise and say in words why a sensor is at fault."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gateway.contracts import AlarmKind
from gateway.inference.plausibility import PlausibilityChecker
from gateway.sample import MDC, Sample, SampleBlock, Stream, industrial_metric

SPO2_5HZ = Stream("ox", "bed-1", "OX-1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=5.0)
MOTOR = Stream(
    "plc", "pump-1", "PLC-1", industrial_metric("Pump1/Motor/Temperature", "Cel"), "industrial", 10.0
)


def test_a_desaturation_in_1_percent_steps_at_5_hz_is_no_sensor_fault() -> None:
    # 97 % -> 84 % in whole-percent steps of 0.2 s each (5 Hz), one step a second: a fast desaturation.
    values = [97.0] * 10 + [float(v) for v in np.arange(96.0, 83.0, -1.0) for _ in range(5)] + [84.0] * 50
    t = 100.0 + np.arange(len(values)) * 0.2
    chk = PlausibilityChecker()
    alarms = [
        chk.check_sample(Sample(SPO2_5HZ, float(ti), float(ti), v)) for ti, v in zip(t, values, strict=True)
    ]
    assert [a for a in alarms if a is not None] == []


def test_three_patients_at_5_hz_flicker_by_1_percent_without_a_single_fault() -> None:
    rng = np.random.default_rng(3)
    chk = PlausibilityChecker()
    n = 0
    for bed in range(3):
        s = Stream("ox", f"bed-{bed}", f"OX-{bed}", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=5.0)
        t = np.arange(0.0, 204.0, 0.2)
        v = np.round(96.5 + 0.6 * rng.standard_normal(t.size))  # whole percent, flickering
        n += len(chk.check_block(SampleBlock(s, t, t, v, np.zeros(t.size, np.uint8))))
    assert n == 0


def test_a_noisy_healthy_motor_temperature_for_an_hour_raises_no_rate_fault() -> None:
    # 10 Hz, 72 Cel with 0.4 Cel of sensor noise: sample-to-sample steps reach 2 Cel in 0.1 s.
    rng = np.random.default_rng(9)
    t = np.arange(0.0, 3600.0, 0.1)
    v = 72.0 + 0.5 * np.sin(t / 300.0) + 0.4 * rng.standard_normal(t.size)
    chk = PlausibilityChecker()
    alarms = []
    for i in range(0, t.size, 100):  # blocks of 10 s, as the OPC UA driver hands them over
        sl = slice(i, i + 100)
        alarms += chk.check_block(SampleBlock(MOTOR, t[sl], t[sl], v[sl], np.zeros(t[sl].size, np.uint8)))
    assert alarms == []


def test_a_real_jump_is_a_fault_logged_once_in_words(caplog: pytest.LogCaptureFixture) -> None:
    chk = PlausibilityChecker()
    values = [72.0] * 20 + [95.0] * 20 + [72.0] * 20
    t = np.arange(len(values)) * 0.1
    with caplog.at_level(logging.INFO, logger="gateway.inference.plausibility"):
        alarms = chk.check_block(SampleBlock(MOTOR, t, t, np.array(values), np.zeros(len(values), np.uint8)))
    assert [a.kind for a in alarms] == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED]
    assert alarms[0].detail["rule"] == "rate"
    faults = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(faults) == 1
    assert "sensor fault: rate +" in faults[0]
    assert "Cel/s beyond +-2 Cel/s" in faults[0]
    assert any("plausible again" in r.getMessage() for r in caplog.records)
