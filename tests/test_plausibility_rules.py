"""Plausibility rules that tolerate measurement noise and say in words why a sensor is at fault."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest

from gateway.contracts import Alarm, AlarmKind
from gateway.inference.plausibility import DEFAULT_RULES, PlausibilityChecker, Rule
from gateway.sample import MDC, Quality, Sample, SampleBlock, Stream, industrial_metric, valid_sample
from gateway.units import converter

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
    t = np.asarray(np.arange(len(values)) * 0.1, np.float64)
    with caplog.at_level(logging.INFO, logger="gateway.inference.plausibility"):
        alarms = chk.check_block(SampleBlock(MOTOR, t, t, np.array(values), np.zeros(len(values), np.uint8)))
    assert [a.kind for a in alarms] == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED]
    assert alarms[0].detail["rule"] == "rate"
    faults = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(faults) == 1
    assert "sensor fault: rate +" in faults[0]
    assert "Cel/s beyond +-2 Cel/s" in faults[0]
    assert any("plausible again" in r.getMessage() for r in caplog.records)


#: A second unit for each unit the default rules are written in.
OTHER_UNIT = {
    "/min": "1/s",
    "%": "1",
    "ms": "s",
    "Cel": "K",
    "mm[Hg]": "kPa",
    "A": "mA",
    "bar": "kPa",
    "V": "mV",
    "l/min": "m3/h",
}


def _faults(stream: Stream, values: list[float], dt: float = 1.0) -> list[str]:
    chk = PlausibilityChecker()
    out = []
    for i, v in enumerate(values):
        a = chk.check_sample(Sample(stream, i * dt, i * dt, v))
        if a is not None:
            out.append(f"{a.kind.value}:{a.detail.get('rule', '')}")
    return out


@pytest.mark.parametrize(
    ("metric", "rule"),
    [(m, r) for m, r in DEFAULT_RULES.items() if r.unit in OTHER_UNIT],
    ids=[m for m, r in DEFAULT_RULES.items() if r.unit in OTHER_UNIT],
)
def test_each_default_rule_holds_in_two_units(metric: str, rule: Rule) -> None:
    assert rule.unit is not None
    for unit in (rule.unit, OTHER_UNIT[rule.unit]):
        to = converter(rule.unit, unit)
        assert to is not None, unit
        name = metric if metric.startswith("MDC_") else f"Line/{metric}"
        s = Stream("src", "subj", "dev", industrial_metric(name, unit), rate_hz=1.0)
        mid = (rule.lo + rule.hi) / 2
        assert _faults(s, [to(mid)] * 3 + [to(rule.hi - 1e-6 * (rule.hi - rule.lo))]) == [], unit
        over = [to(mid)] * 3 + [to(rule.hi + 0.01 * (rule.hi - rule.lo))] + [to(mid)] * 3
        assert _faults(s, over) == ["sensor_fault:range", "sensor_restored:plausibility"], unit
        if rule.max_rate_per_s is not None:
            step = min(mid + 3 * rule.max_rate_per_s, rule.hi)  # a jump 3x the limit within a second
            jump = [to(mid)] * 3 + [to(step)] * 2 + [to(mid)] * 3  # held 2 s, then back
            assert _faults(s, jump) == ["sensor_fault:rate", "sensor_restored:plausibility"], unit


def test_a_line_at_250_kpa_is_in_range_and_a_stream_in_an_unknown_unit_gets_no_rule() -> None:
    kpa = Stream("plc", "line", "PLC", industrial_metric("Line2/Pressure", "kPa"), "industrial", 1.0)
    assert _faults(kpa, [250.0] * 10) == []  # 2.5 bar, not "above 16 bar"
    rule = PlausibilityChecker().rule_for(kpa)
    assert rule is not None
    assert rule.lo == pytest.approx(-100.0)
    assert rule.hi == pytest.approx(1600.0)
    assert rule.unit == "kPa"
    raw = Stream("plc", "line", "PLC", industrial_metric("Line2/Pressure", "counts"), "industrial", 1.0)
    assert PlausibilityChecker().rule_for(raw) is None
    hot = Stream("plc", "m", "PLC", industrial_metric("M/Temperature", "K"), "industrial", 1.0)
    k_rule = PlausibilityChecker().rule_for(hot)
    assert k_rule is not None
    assert k_rule.max_rate_per_s == pytest.approx(2.0)  # a rate of 2 Cel/s is 2 K/s, not 275 K/s
    assert k_rule.hi == pytest.approx(423.15)


def _kinds(alarms: list[Alarm | None]) -> list[str]:
    return [f"{a.kind.value}:{a.detail['rule']}" for a in alarms if a is not None]


def test_a_fault_of_a_stream_is_ended_by_the_stream_its_driver_rebuilt_under_the_same_key() -> None:
    # An OPC UA server revising the sampling interval after a PLC restart: same key, another rate.
    chk = PlausibilityChecker()
    slower = replace(MOTOR, rate_hz=2.0)
    hot = [chk.check_sample(Sample(MOTOR, 10.0 + 0.1 * k, 0.0, 200.0)) for k in range(5)]
    assert _kinds(hot) == ["sensor_fault:range"]
    back = [chk.check_sample(Sample(slower, 20.0 + 0.5 * k, 0.0, 72.0)) for k in range(3)]
    assert _kinds(back) == ["sensor_restored:plausibility"]
    assert next(a for a in back if a is not None).stream is slower
    # Blocks take the same path: a block of the old object after the new one is the same sensor.
    t = np.arange(30.0, 31.0, 0.1)
    again = chk.check_block(SampleBlock(MOTOR, t, t, np.full(t.size, 200.0), np.zeros(t.size, np.uint8)))
    assert _kinds(list(again)) == ["sensor_fault:range"]
    t2 = t + 2.0
    ok = chk.check_block(SampleBlock(slower, t2, t2, np.full(t.size, 72.0), np.zeros(t.size, np.uint8)))
    assert _kinds(list(ok)) == ["sensor_restored:plausibility"]


def test_a_stream_rebuilt_in_another_unit_is_judged_in_its_own_unit_with_no_rate_across_units() -> None:
    chk = PlausibilityChecker()
    kelvin = replace(MOTOR, metric=industrial_metric("Pump1/Motor/Temperature", "K"))
    assert _kinds([chk.check_sample(Sample(MOTOR, 10.0 + 0.1 * k, 0.0, 72.0)) for k in range(20)]) == []
    # 72 Cel is 345.15 K: a step of 273 against the Celsius reference would be a rate fault.
    same = [chk.check_sample(Sample(kelvin, 12.0 + 0.1 * k, 0.0, 345.15)) for k in range(20)]
    assert _kinds(same) == []
    # The Kelvin stream's rule is in Kelvin: 200 Cel (473.15 K) is above 150 Cel, 72 Cel is not.
    hot = [chk.check_sample(Sample(kelvin, 14.0 + 0.1 * k, 0.0, 473.15)) for k in range(5)]
    assert _kinds(hot) == ["sensor_fault:range"]
    # A fault raised in Kelvin is ended by the first plausible value in Celsius, the unit going back.
    cool = [chk.check_sample(Sample(MOTOR, 16.0 + 0.1 * k, 0.0, 72.0)) for k in range(5)]
    assert _kinds(cool) == ["sensor_restored:plausibility"]


def test_only_a_value_out_of_range_is_kept_from_the_limits_one_at_a_time_and_in_blocks() -> None:
    # 97 %, a step to 84 % (in range, faster than 4 %/s: a rate suspect, then a rate fault), 30 %
    # (out of range), 84 % again (4 s after the 97 %: plausible).  Only 30 % is kept from the limits.
    values = [97.0, 84.0, 84.0, 30.0, 84.0]
    one = PlausibilityChecker()
    verdicts = []
    for i, v in enumerate(values):
        one.check_sample(Sample(SPO2_5HZ, float(i), 1.7e9 + i, v))
        verdicts.append((one.implausible(SPO2_5HZ), one.out_of_range(SPO2_5HZ)))
    assert verdicts == [(False, False), (True, False), (True, False), (True, True), (False, False)]
    t = np.arange(len(values), dtype=float)
    block = SampleBlock(SPO2_5HZ, t, t + 1.7e9, np.array(values), np.zeros(t.size, np.uint8))
    _, implausible, out_of_range = PlausibilityChecker().judge_block(block)
    assert implausible is not None
    assert out_of_range is not None
    assert list(zip(implausible.tolist(), out_of_range.tolist(), strict=True)) == verdicts


ART, OFF, NO_VALUE = int(Quality.ARTIFACT), int(Quality.SENSOR_OFF), math.nan
#: Instants (sample indexes) of a stream's plausibility alarms, and per sample whether it was judged
#: implausible and out of range (an invalid sample: neither, it is not checked).
_Verdicts = tuple[list[tuple[str, str, int]], list[tuple[bool, bool]]]


def _one_by_one(rows: list[tuple[float, int]], dt: float) -> _Verdicts:
    chk = PlausibilityChecker()
    alarms, per = [], []
    for i, (v, q) in enumerate(rows):
        sample = Sample(SPO2_5HZ, i * dt, 1.7e9 + i * dt, v, Quality(q))
        a = chk.check_sample(sample)
        if a is not None:
            alarms.append((a.kind.value, str(a.detail["rule"]), i))
        checked = valid_sample(sample)  # as the pipeline asks the checker after each sample
        per.append((checked and chk.implausible(SPO2_5HZ), checked and chk.out_of_range(SPO2_5HZ)))
    return alarms, per


def _in_blocks(rows: list[tuple[float, int]], dt: float, size: int) -> _Verdicts:
    chk = PlausibilityChecker()
    alarms: list[tuple[str, str, int]] = []
    per: list[tuple[bool, bool]] = []
    for k in range(0, len(rows), size):
        part = rows[k : k + size]
        t = np.arange(k, k + len(part), dtype=np.float64) * dt
        v = np.array([x for x, _ in part])
        block = SampleBlock(SPO2_5HZ, t, t + 1.7e9, v, np.array([q for _, q in part], np.uint8))
        got, bad, off = chk.judge_block(block)
        alarms += [(a.kind.value, str(a.detail["rule"]), round(a.t_mono / dt)) for a in got]
        none = [False] * len(part)
        per += zip(none if bad is None else bad.tolist(), none if off is None else off.tolist(), strict=True)
    return alarms, per


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (  # 97 %, then 84 % at once, held (artifact-flagged every other sample at first), then 97 % again
            [(97.0, 0)] * 10 + [(84.0, 0), (84.0, ART)] * 3 + [(84.0, 0)] * 10 + [(97.0, 0)] * 10,
            [
                ("sensor_fault", "rate", 16),
                ("sensor_restored", "plausibility", 22),
                ("sensor_fault", "rate", 31),
            ],
        ),
        (  # the same with the device sending no value every other sample at first
            [(97.0, 0)] * 10 + [(84.0, 0), (NO_VALUE, 0)] * 3 + [(84.0, 0)] * 10 + [(97.0, 0)] * 10,
            [
                ("sensor_fault", "rate", 16),
                ("sensor_restored", "plausibility", 22),
                ("sensor_fault", "rate", 31),
            ],
        ),
        (  # 30 % out of range, through a probe off, a flagged 97 % and 0 %, no value, back to 96 %
            [(97.0, 0)] * 5
            + [(30.0, 0), (30.0, OFF), (NO_VALUE, 0), (30.0, 0), (97.0, ART), (0.0, ART), (96.0, 0)]
            + [(97.0, 0)] * 5,
            [("sensor_fault", "range", 5), ("sensor_restored", "plausibility", 11)],
        ),
    ],
    ids=["flagged-inside-a-rate-excursion", "no-value-inside-a-rate-excursion", "out-of-range"],
)
def test_a_block_one_or_several_raises_and_clears_at_the_samples_that_one_by_one_do(
    rows: list[tuple[float, int]], expected: list[tuple[str, str, int]]
) -> None:
    """An invalid sample (flagged, no value) neither extends nor breaks a rate run, in a block or alone.

    5 Hz SpO2, 4 %/s at most: the step to 84 % at sample 10 is a fault once valid samples over the
    limit span a second (at 16; the flagged or empty ones between count for nothing, nor break the
    run); 84 % is plausible again once its step from the last plausible 97 % (sample 5) is under
    4 %/s over the time between (at 22); the step back to 97 % is a fault again 1 s on (26 to 31).
    """
    alone = _one_by_one(rows, 0.2)
    assert alone[0] == expected
    for size in (len(rows), 7, 3, 1):
        assert _in_blocks(rows, 0.2, size) == alone, size


def test_a_block_ends_a_fault_a_previous_run_left_on_a_stream_that_now_has_no_rule() -> None:
    # The rule of a previous run: the fault it raised ends at the first valid value, as one by one.
    cpm = Stream("plc", "line", "PLC", industrial_metric("Line2/Pressure", "counts"), "industrial", 1.0)
    for by_block in (False, True):
        chk = PlausibilityChecker()
        chk.resume(cpm)
        rows = [(1.0, ART), (NO_VALUE, 0), (250.0, 0), (260.0, 0)]
        t = np.arange(4.0)
        if by_block:
            v, q = np.array([x for x, _ in rows]), np.array([f for _, f in rows], np.uint8)
            got = chk.check_block(SampleBlock(cpm, t, t, v, q))
        else:
            got = [
                a
                for i, (x, f) in enumerate(rows)
                if (a := chk.check_sample(Sample(cpm, i, i, x, Quality(f))))
            ]
        assert [(a.kind, a.t_mono) for a in got] == [(AlarmKind.SENSOR_RESTORED, 2.0)], by_block
