"""Ectopy verdicts a nurse can trust: true couplets, no false couplets, flagged beats, a cleared event."""

from __future__ import annotations

import numpy as np

from drivers.sim.protocol import RR, PatientGenerator
from gateway.contracts import Alarm, AlarmKind
from gateway.inference.ectopic import BURDEN_BEATS, EctopicDetector, EctopyMonitor
from gateway.sample import MDC, Quality, Sample, Stream

RRS = Stream("strap", "bed1", "strap-1", MDC[RR])


def sinus(n: int, seed: int = 3) -> list[float]:
    rr = PatientGenerator(seed=seed, rate_hz=1.0).generate(0.0, n * 1.2).series[RR].value
    return [float(x) for x in rr[:n]]


def judged(rr: list[float]) -> dict[int, bool]:
    det = EctopicDetector()
    out: dict[int, bool] = {}
    for x in rr:
        for beat in det.feed(x):
            out[beat.index] = beat.ectopic
    return out


def monitor(rr: list[float], quality: list[Quality] | None = None) -> list[Alarm]:
    mon = EctopyMonitor()
    t = np.cumsum(rr) / 1000.0
    out = []
    for i, (ti, x) in enumerate(zip(t, rr, strict=True)):
        q = quality[i] if quality else Quality.GOOD
        a = mon.update(Sample(RRS, float(ti), float(ti), x, q))
        if a is not None:
            out.append(a)
    return out


def test_a_true_couplet_is_two_ectopic_beats_and_raises_one_alarm() -> None:
    rr = [800.0] * 20 + [560.0, 560.0, 1280.0] + [800.0] * 10
    got = judged(rr)
    assert got[20]
    assert got[21]
    assert not got[22]  # the pause closes a beat of sinus timing: judged, not skipped
    assert not any(v for i, v in got.items() if i not in (20, 21))
    alarms = monitor(rr)
    assert [(a.kind, a.detail["rule"]) for a in alarms] == [(AlarmKind.ANOMALY, "couplet")]


def test_two_pvcs_one_beat_apart_are_not_a_couplet() -> None:
    rr = [800.0] * 20 + [560.0, 1040.0, 560.0, 1040.0] + [800.0] * 10
    got = judged(rr)
    assert got[20]
    assert got[22]
    assert not got[21]
    assert not got[23]
    assert monitor(rr) == []  # two isolated PVCs: counted, not alarmed


def test_a_sudden_rate_change_without_a_pause_is_not_ectopy() -> None:
    rr = [800.0] * 20 + [600.0] * 30
    assert not any(judged(rr).values())


def test_no_skin_contact_beats_never_reach_the_detector() -> None:
    # A loose strap: the device flags the beats and sends garbage intervals alternating short/long.
    rr = [800.0] * 20 + [400.0, 1200.0] * 10 + [800.0] * 20
    flags = [Quality.GOOD] * 20 + [Quality.SENSOR_OFF] * 20 + [Quality.GOOD] * 20
    assert monitor(rr, flags) == []
    assert monitor(rr)  # the same intervals unflagged would have alarmed


def test_an_ectopy_episode_turns_indeterminate_resumes_then_clears_after_sinus_rhythm() -> None:
    rr = sinus(400)
    for i in range(100, 180, 2):  # bigeminy for 80 beats
        s = rr[i]
        rr[i] = round(0.7 * s)
        rr[i + 1] = round(rr[i + 1] + s - rr[i])
    flags = [Quality.GOOD] * len(rr)
    for i in range(140, 150):  # the strap comes loose during the episode
        flags[i] = Quality.SENSOR_OFF
    alarms = monitor(rr, flags)
    assert [a.kind for a in alarms] == [
        AlarmKind.ANOMALY,
        AlarmKind.ANOMALY_INDETERMINATE,
        AlarmKind.ANOMALY,
        AlarmKind.ANOMALY_CLEARED,
    ]
    assert alarms[1].detail["reason"] == "sensor_quality"
    assert alarms[2].detail["episode"] == "resumed"
    assert alarms[3].detail["model"] == "rr_ectopic"
    # Cleared only after the last ectopic beat has left enough of the burden window.
    beat_t = np.cumsum(rr) / 1000.0
    cleared_at = int(np.searchsorted(beat_t, alarms[3].t_mono))
    assert cleared_at >= 180 + BURDEN_BEATS // 2
