"""Limit alarms: alarm condition delays, priorities, deadband, off-delays, per-subject limits, config."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from drivers import REGISTRY
from gateway.alarms.config import AlarmsSection, limit_checker
from gateway.config import validate
from gateway.contracts import Alarm, AlarmClass, AlarmKind, AlarmPriority
from gateway.errors import InvalidConfigError
from gateway.sample import MDC, Quality, Sample, SampleBlock, Stream, industrial_metric

SPO2 = Stream("ox", "bed-7", "OX-1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
HR = Stream("ox", "bed-7", "OX-1", MDC["MDC_ECG_HEART_RATE"], rate_hz=1.0)
PRESSURE = Stream(
    "plc", "pump-3", "PLC-1", industrial_metric("Pump1/Hydraulics/Pressure", "bar"), "industrial", 1.0
)


def feed(
    stream: Stream,
    values: list[float],
    *,
    section: dict[str, Any] | None = None,
    t0: float = 0.0,
    quality: list[int] | None = None,
) -> list[Alarm]:
    """One sample a second through a checker; the alarms raised."""
    checker = limit_checker(AlarmsSection.model_validate(section or {}))
    out = []
    for i, v in enumerate(values):
        q = Quality(quality[i]) if quality else Quality.GOOD
        a = checker.check_sample(Sample(stream, t0 + i, 1.7e9 + t0 + i, v, q))
        if a is not None:
            out.append(a)
    return out


def test_spo2_below_90_for_10_s_is_a_medium_priority_physiological_alarm() -> None:
    # 9 s below 90 % is nothing; 12 s is one alarm, raised when the condition has held 10 s.
    values = [97.0] * 5 + [88.0] * 9 + [97.0] * 5 + [88.0] * 12 + [97.0] * 3
    alarms = feed(SPO2, values)
    assert [a.kind for a in alarms] == [AlarmKind.LIMIT, AlarmKind.LIMIT_CLEARED]
    raised, cleared = alarms
    assert raised.t_mono == 19 + 10  # onset at t=19, held 10 s
    assert (raised.priority, raised.limit, raised.value, raised.held_s) == (
        AlarmPriority.MEDIUM,
        90.0,
        88.0,
        10.0,
    )
    assert raised.alarm_class is AlarmClass.PHYSIOLOGICAL
    assert raised.detail == {"level": "low"}
    assert cleared.t_mono == 31
    assert cleared.held_s == 12.0  # the whole condition
    assert cleared.priority is None


def test_a_deeper_fall_escalates_to_high_priority_then_clears_once() -> None:
    values = [97.0] * 3 + [88.0] * 4 + [83.0] * 12 + [88.0] * 4 + [97.0] * 2
    alarms = feed(SPO2, values)
    assert [(a.kind, a.priority, a.limit) for a in alarms] == [
        (AlarmKind.LIMIT, AlarmPriority.MEDIUM, 90.0),  # < 90 since t=3, held 10 s at t=13
        (AlarmKind.LIMIT, AlarmPriority.HIGH, 85.0),  # < 85 since t=7, held 10 s at t=17
        (AlarmKind.LIMIT, AlarmPriority.MEDIUM, 90.0),  # back above 85 + deadband: still below 90
        (AlarmKind.LIMIT_CLEARED, None, 90.0),
    ]
    assert [a.t_mono for a in alarms] == [13, 17, 19, 23]


def test_deadband_keeps_noise_around_the_limit_from_chattering() -> None:
    # Around 90 % after the alarm: 90 and 89 alternate; clearing needs >= 91 (deadband 1 %).
    values = [88.0] * 11 + [90.0, 89.0] * 10 + [91.0]
    alarms = feed(SPO2, values)
    assert [a.kind for a in alarms] == [AlarmKind.LIMIT, AlarmKind.LIMIT_CLEARED]
    assert alarms[1].t_mono == len(values) - 1


def test_heart_rate_high_and_high_high_priorities() -> None:
    alarms = feed(HR, [70.0] * 2 + [130.0] * 11 + [70.0])
    assert [(a.kind, a.priority, a.limit) for a in alarms] == [
        (AlarmKind.LIMIT, AlarmPriority.MEDIUM, 120.0),
        (AlarmKind.LIMIT_CLEARED, None, 120.0),
    ]
    alarms = feed(HR, [70.0] * 2 + [160.0] * 11 + [70.0])
    assert [(a.kind, a.priority, a.detail["level"]) for a in alarms] == [
        (AlarmKind.LIMIT, AlarmPriority.HIGH, "high_high"),  # H and HH both held 10 s: the worse
        (AlarmKind.LIMIT_CLEARED, None, "high_high"),
    ]


def test_probe_off_samples_neither_raise_nor_clear() -> None:
    values = [88.0] * 11 + [0.0] * 20 + [88.0, 95.0]
    quality = [0] * 11 + [int(Quality.SENSOR_OFF)] * 20 + [0, 0]
    alarms = feed(SPO2, values, quality=quality)
    assert [a.kind for a in alarms] == [AlarmKind.LIMIT, AlarmKind.LIMIT_CLEARED]
    assert alarms[1].value == 95.0  # cleared by a measurement, not by the probe coming off
    assert not feed(SPO2, [math.nan] * 20)


def test_implausible_samples_pause_the_delay_one_at_a_time_and_in_blocks() -> None:
    # Below LL for 4 s, then 17 s of values the plausibility rules rejected, then below LL again:
    # raised once 10 s of valid data held (6 s after the return), not on the rejected values.
    values = [84.0] * 4 + [30.0] * 17 + [84.0] * 10
    invalid = [False] * 4 + [True] * 17 + [False] * 10
    t = np.arange(len(values), dtype=float)
    checker = limit_checker(AlarmsSection())
    one = [
        checker.check_sample(Sample(SPO2, float(ti), ti + 1.7e9, v), invalid=bad)
        for ti, v, bad in zip(t, values, invalid, strict=True)
    ]
    got = [(a.kind, a.t_mono, a.detail["level"], a.value, a.held_s) for a in one if a is not None]
    assert got == [(AlarmKind.LIMIT, 27.0, "low_low", 84.0, 10.0)]
    block = SampleBlock(SPO2, t, t + 1.7e9, np.array(values), np.zeros(t.size, np.uint8))
    blocks = limit_checker(AlarmsSection()).check_block(block, np.array(invalid))
    assert [(a.kind, a.t_mono, a.detail["level"], a.value, a.held_s) for a in blocks] == got


def _timed(
    checker: Any, stream: Stream, samples: list[tuple[float, float]]
) -> list[tuple[AlarmKind, float, float]]:
    """(t, value) samples through ``checker``, one at a time; each alarm's kind, time and held_s."""
    out = []
    for t, v in samples:
        a = checker.check_sample(Sample(stream, t, 1.7e9 + t, v))
        if a is not None:
            out.append((a.kind, a.t_mono, a.held_s))
    return out


def test_a_silence_longer_than_the_loss_time_pauses_the_delays() -> None:
    # SpO2 below LL for 4 s, then nothing for 60 s (lost after 15 s), then below again: the silence
    # is no measurement, so the on-delay goes on from 4 s held, 6 s more.  The same with a silence
    # shorter than the loss time (a few missed samples) counts it, as the sensor was not lost.
    checker = limit_checker(AlarmsSection(), lost_after_s=15.0)
    below = [(float(t), 80.0) for t in range(5)] + [(65.0 + t, 80.0) for t in range(10)]
    assert _timed(checker, SPO2, below) == [(AlarmKind.LIMIT, 71.0, 10.0)]
    short = [(float(t), 80.0) for t in range(5)] + [(17.0 + t, 80.0) for t in range(3)]
    assert _timed(limit_checker(AlarmsSection(), lost_after_s=15.0), SPO2, short) == [
        (AlarmKind.LIMIT, 17.0, 17.0)
    ]
    # Alarm on (t=10), back within from t=12 (off-delay 10 s, 3 s of it run at t=15), 60 s silent:
    # still on at the first sample after; cleared once 10 s back within were measured.
    rule = {"limits": {"MDC_PULS_OXIM_SAT_O2": {"off_delay_s": 10}}}
    checker = limit_checker(AlarmsSection.model_validate(rule), lost_after_s=15.0)
    samples = [(float(t), 80.0) for t in range(12)] + [(float(t), 95.0) for t in range(12, 16)]
    samples += [(76.0 + t, 95.0) for t in range(8)]
    got = _timed(checker, SPO2, samples)
    assert got == [(AlarmKind.LIMIT, 10.0, 10.0), (AlarmKind.LIMIT_CLEARED, 83.0, 83.0)]


def test_a_silence_then_invalid_samples_pauses_the_delays_from_the_last_valid_sample() -> None:
    # A probe put back after a loss sends flagged (or implausible) samples first: the silence before
    # them is no measurement either, one sample at a time and in blocks.
    artifact = int(Quality.ARTIFACT)
    below = [(float(t), 80.0, 0) for t in range(5)]
    after = [(65.0, 97.0, artifact), (66.0, 97.0, artifact)] + [(67.0 + t, 80.0, 0) for t in range(10)]
    checker = limit_checker(AlarmsSection(), lost_after_s=15.0)
    got = []
    for t, v, q in below + after:
        a = checker.check_sample(Sample(SPO2, t, 1.7e9 + t, v, Quality(q)))
        if a is not None:
            got.append((a.kind, a.t_mono, a.held_s))
    assert got == [(AlarmKind.LIMIT, 73.0, 10.0)]  # 4 s held before, 6 more from 67 s: not at once
    # In blocks, an out-of-range sample (judged implausible) after the silence.
    checker = limit_checker(AlarmsSection(), lost_after_s=15.0)

    def block(ts: list[float], vs: list[float]) -> SampleBlock:
        t = np.array(ts, float)
        return SampleBlock(SPO2, t, t + 1.7e9, np.array(vs, float), np.zeros(len(ts), np.uint8))

    alarms = checker.check_block(block([float(t) for t in range(5)], [80.0] * 5))
    alarms += checker.check_block(block([65.0], [0.0]), np.array([True]))
    alarms += checker.check_block(block([66.0 + k for k in range(10)], [80.0] * 10))
    assert [(a.kind, a.t_mono, a.held_s) for a in alarms] == [(AlarmKind.LIMIT, 72.0, 10.0)]
    # Off-delay: alarm on, 3 s back within, 60 s silent, one flagged sample: still on until 10 s
    # back within were measured.
    rule = {"limits": {"MDC_PULS_OXIM_SAT_O2": {"off_delay_s": 10}}}
    checker = limit_checker(AlarmsSection.model_validate(rule), lost_after_s=15.0)
    samples = [(float(t), 80.0, 0) for t in range(12)] + [(float(t), 95.0, 0) for t in range(12, 16)]
    samples += [(76.0, 95.0, artifact)] + [(77.0 + t, 95.0, 0) for t in range(10)]
    got = []
    for t, v, q in samples:
        a = checker.check_sample(Sample(SPO2, t, 1.7e9 + t, v, Quality(q)))
        if a is not None:
            got.append((a.kind, a.t_mono, a.held_s))
    assert [(k, t) for k, t, _ in got] == [(AlarmKind.LIMIT, 10.0), (AlarmKind.LIMIT_CLEARED, 84.0)]


def test_industrial_low_pressure_with_isa_on_and_off_delays() -> None:
    # Default pressure limits (bar): L 0.9 medium, LL 0.6 high, 15 s on and off delays, 0.02 deadband.
    noise = np.random.default_rng(1).normal(0.0, 0.01, 100)
    healthy = (1.2 + noise[:40]).tolist()
    assert not feed(PRESSURE, healthy)
    values = [1.2] * 5 + [0.7] * 20 + [0.91] * 20 + [1.2] * 20  # 0.91 is inside by less than the deadband
    alarms = feed(PRESSURE, values)
    assert [(a.kind, a.t_mono) for a in alarms] == [(AlarmKind.LIMIT, 20), (AlarmKind.LIMIT_CLEARED, 45 + 15)]
    assert alarms[0].alarm_class is AlarmClass.PROCESS
    assert alarms[0].priority is AlarmPriority.MEDIUM
    assert alarms[1].held_s == 55.0


def test_a_block_raises_what_the_samples_would() -> None:
    values = np.array([97.0] * 5 + [88.0] * 12 + [97.0] * 3)
    quality = np.zeros(values.size, np.uint8)
    t = np.arange(values.size, dtype=float)
    checker = limit_checker(AlarmsSection())
    alarms = checker.check_block(SampleBlock(SPO2, t, t + 1.7e9, values, quality))
    assert [(a.kind, a.t_mono) for a in alarms] == [(AlarmKind.LIMIT, 15.0), (AlarmKind.LIMIT_CLEARED, 17.0)]
    healthy = np.full(100, 97.0)
    t = np.arange(100, 200, dtype=float)
    assert not checker.check_block(SampleBlock(SPO2, t, t, healthy, np.zeros(100, np.uint8)))


def test_limits_are_converted_to_the_stream_unit_or_not_applied() -> None:
    kpa = Stream("plc", "pump-3", "PLC-1", industrial_metric("Line/Pressure", "kPa"), "industrial", 1.0)
    rule = limit_checker(AlarmsSection()).rule_for(kpa)
    assert rule is not None
    assert rule.bounds == pytest.approx({"low_low": 60.0, "low": 90.0, "high": 250.0})  # 0.6/0.9/2.5 bar
    assert rule.deadband == pytest.approx(2.0)
    assert not feed(kpa, [240.0] * 30)  # 240 kPa is inside 2.5 bar
    (a,) = feed(kpa, [120.0] * 5 + [80.0] * 16)
    assert a.limit == pytest.approx(90.0)
    assert (a.value, a.priority) == (80.0, AlarmPriority.MEDIUM)
    counts = Stream("plc", "pump-3", "PLC-1", industrial_metric("Line/Pressure", "counts"), "industrial", 1.0)
    assert limit_checker(AlarmsSection()).rule_for(counts) is None  # raw counts: no limits to compare


def test_per_subject_limits_merge_onto_the_defaults() -> None:
    section = {
        "limits": {"MDC_PULS_OXIM_SAT_O2": {"low": 88.0}},
        "subjects": {"bed-9": {"MDC_PULS_OXIM_SAT_O2": {"enabled": False}}},
    }
    values = [97.0] + [89.0] * 12
    assert not feed(SPO2, values, section=section)  # 89 is above this ward's 88
    (a,) = feed(SPO2, [97.0] + [84.0] * 12, section=section)
    assert a.limit == 85.0  # low_low kept from the defaults
    bed9 = Stream("ox", "bed-9", "OX-2", SPO2.metric, rate_hz=1.0)
    assert not feed(bed9, [97.0] + [70.0] * 20, section=section)
    assert not feed(SPO2, [97.0] + [70.0] * 20, section={"defaults": False})


def test_limit_config_problems_name_the_key() -> None:
    with pytest.raises(InvalidConfigError) as info:
        validate({"alarms": {"limits": {"MDC_PULS_OXIM_SAT_O2": {"low": 80.0}}}}, "<t>", REGISTRY)
    text = str(info.value)
    assert "alarms" in text
    assert "low_low 85 is not below low 80" in text
    with pytest.raises(InvalidConfigError) as info:
        validate({"alarms": {"limits": {"X": {"priority_low": "urgent"}}}}, "<t>", REGISTRY)
    assert "priority_low" in str(info.value)


def test_new_rules_taken_in_place_keep_an_active_alarm_until_it_clears_by_them() -> None:
    """A config revision retunes [alarms] without a restart: the active alarm is not forgotten."""
    checker = limit_checker(AlarmsSection.model_validate({}))
    out = []
    for t in range(14):  # 88 % for 14 s: the default low (90 %) raised at t=10
        a = checker.check_sample(Sample(SPO2, t, 1.7e9 + t, 88.0, Quality.GOOD))
        out += [a] if a is not None else []
    assert [a.kind for a in out] == [AlarmKind.LIMIT]
    lower = {"limits": {"MDC_PULS_OXIM_SAT_O2": {"low": 86.0, "low_low": 80.0}}}
    checker.take_rules(limit_checker(AlarmsSection.model_validate(lower)))
    for t in range(14, 20):  # still 88 %: inside the new low limit (86 % + deadband)
        a = checker.check_sample(Sample(SPO2, t, 1.7e9 + t, 88.0, Quality.GOOD))
        out += [a] if a is not None else []
    assert [(a.kind, a.limit) for a in out] == [(AlarmKind.LIMIT, 90.0), (AlarmKind.LIMIT_CLEARED, 86.0)]
    assert out[1].t_mono == 14  # cleared at once by the new rule, not raised again


def _spo2(checker: Any, times: range, value: float) -> list[Alarm]:
    out = []
    for t in times:
        a = checker.check_sample(Sample(SPO2, t, 1.7e9 + t, value, Quality.GOOD))
        out += [a] if a is not None else []
    return out


def test_new_rules_without_the_active_level_clear_the_alarm_by_the_old_rule() -> None:
    """A revision that drops the active level (or the whole rule) clears the alarm, not leaves it on forever."""
    for new in (
        {"limits": {"MDC_PULS_OXIM_SAT_O2": {"low": None, "low_low": 80.0}}},  # the active "low" gone
        {"limits": {"MDC_PULS_OXIM_SAT_O2": {"enabled": False}}},  # the rule disabled
    ):
        checker = limit_checker(AlarmsSection.model_validate({}))
        assert [a.kind for a in _spo2(checker, range(14), 88.0)] == [AlarmKind.LIMIT]
        cleared = checker.take_rules(limit_checker(AlarmsSection.model_validate(new)))
        assert [(a.kind, a.limit, a.detail, a.t_mono) for a in cleared] == [
            (AlarmKind.LIMIT_CLEARED, 90.0, {"level": "low"}, 13)  # by the old rule, at the last sample
        ]
        # Still 88 %, then back to normal: nothing more, and no KeyError on the pruned level.
        assert _spo2(checker, range(14, 30), 88.0) + _spo2(checker, range(30, 40), 97.0) == []


def test_new_rules_forget_a_starting_condition_on_a_level_they_lack() -> None:
    checker = limit_checker(AlarmsSection.model_validate({}))
    assert _spo2(checker, range(5), 83.0) == []  # below 85 and 90 for 5 s: not yet held 10 s
    high_only = {"limits": {"MDC_PULS_OXIM_SAT_O2": {"high": 99.0, "low": None, "low_low": None}}}
    assert checker.take_rules(limit_checker(AlarmsSection.model_validate(high_only))) == []
    assert _spo2(checker, range(5, 30), 83.0) == []
